"""Held-out perplexity of a (pruned, skipping or plain) checkpoint on a JSON-lines text file.

Documents are tokenized as `tokenizer(text)` (BOS added by the tokenizer) followed by EOS,
concatenated in file order and cut into blocks of --block_size tokens (the remainder is
dropped); every token after the first of each block is scored. The model is loaded with
`model.load_model`, so a checkpoint with `betas` is scored with dynamic skipping on, and the
skip rate is reported.

    python eval/perplexity.py --model_path demo/tiny-moe --data ../shared/data/corpus/wiki_heldout.jsonl.xz
    python eval/perplexity.py --model_path CKPT --data ../shared/data/eval/gsm8k_test.jsonl --field answer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from itertools import chain
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from transformers import AutoTokenizer  # noqa: E402

from cli import UsageError, check_output_file, fail  # noqa: E402
from data import DataFileError, read_texts  # noqa: E402
from data.calib import quiet_tokenizer  # noqa: E402
from model import MoEError, load_model  # noqa: E402
from model.loading import DTYPES, CheckpointError, check_checkpoint  # noqa: E402
from model.dynamic_skipping import BetasError  # noqa: E402

BAD_INPUT = (DataFileError, CheckpointError, BetasError, MoEError)


def token_blocks(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """(n_blocks, block_size): <s> doc </s> documents concatenated and cut; the remainder is dropped."""
    with quiet_tokenizer():  # long documents are cut into blocks: the length warning is noise
        ids = tokenizer(texts)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = list(chain.from_iterable(doc + eos for doc in ids))
    n = len(stream) // block_size
    if n == 0:
        raise DataFileError(f"the text gives {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """exp(mean next-token NLL) over every position but the first of each block."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b0 in range(0, blocks.shape[0], batch_size):
        ids = blocks[b0: b0 + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens_scored": count}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint folder")
    p.add_argument("--data", required=True, help="JSON-lines file (plain, .gz or .xz) or JSON array")
    p.add_argument("--field", default="text", help="record field holding the text (default: text)")
    p.add_argument("--max_docs", type=int, default=200, help="first N documents (0: all; default: 200)")
    p.add_argument("--block_size", type=int, default=512, help="tokens per scored block (default: 512)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: the GPU when there is one)")
    p.add_argument("--dtype", default="float32", help="bfloat16, float16, float32 or auto (default: float32)")
    p.add_argument("--no_skipping", action="store_true", help="ignore the checkpoint's betas")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("block_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_docs < 0:
        raise UsageError(f"--max_docs must be >= 0 (0: every document), got {args.max_docs}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    check_output_file(args.output, "--output")


def read_data(args: argparse.Namespace) -> list[str]:
    try:
        texts = read_texts(args.data, field=args.field)
    except FileNotFoundError:
        raise UsageError(f"--data {args.data}: no such file") from None
    return texts[: args.max_docs] if args.max_docs > 0 else texts


def scored_blocks(args: argparse.Namespace, texts: list[str]) -> torch.Tensor:
    """The blocks, from the checkpoint's tokenizer alone: too little text fails before the model loads."""
    try:  # the path, the config and its betas first (a hub id that cannot be reached fails here, once)
        check_checkpoint(args.model_path, skipping=not args.no_skipping)
    except OSError as e:
        raise UsageError(f"cannot read a model config from {args.model_path}: "
                         f"{str(e).strip().splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(args.model_path))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {args.model_path}: {str(e).strip().splitlines()[0]}") from None
    try:
        return token_blocks(texts, tokenizer, args.block_size)
    except DataFileError as e:
        more = " or pass --max_docs 0 to read every document" if len(texts) == args.max_docs else ""
        docs = f"{len(texts)} document" + ("s" if len(texts) != 1 else "")
        raise UsageError(f"--data {args.data} ({docs}): {e}; lower --block_size{more}") from None


def run(args: argparse.Namespace) -> dict:
    check_args(args)
    texts = read_data(args)
    blocks = scored_blocks(args, texts)
    try:
        model, _ = load_model(args.model_path, device=args.device, dtype=args.dtype, skipping=not args.no_skipping)
    except OSError as e:  # no weights, an unreadable config, ...
        raise UsageError(f"cannot load a model from {args.model_path}: {str(e).strip().splitlines()[0]}") from None
    result = {"model_path": args.model_path, "data": args.data, "field": args.field, "documents": len(texts),
              "block_size": args.block_size, "dtype": args.dtype, **perplexity(model, blocks, args.batch_size)}
    if model.dynamic_skipping is not None:
        result["skip_rate"] = model.dynamic_skipping.stats()["skip_rate"]
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (UsageError, *BAD_INPUT) as e:
        return fail("perplexity.py", e)
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
