#!/usr/bin/env python
"""Train the project's demo model: a tiny Mixtral-architecture MoE language model.

Pipeline (all steps are seeded):

1. **Tokenizer** - a byte-level BPE tokenizer (`data/bpe.py`: ByteLevel pre-tokenizer/decoder,
   special tokens ``<unk>`` ``<s>`` ``</s>``, pad = ``</s>``) trained on the training corpus.
   Calling the tokenizer prepends ``<s>``, like the Llama/Mixtral tokenizers do.
2. **Data** - Wikipedia articles (``--wiki_train``, JSON lines with a ``text`` field,
   optionally .xz-compressed) mixed with GSM8K train problems (``--gsm8k_train``,
   ``question + "\\n" + answer`` as one document, repeated ``--gsm8k_repeat`` times) so
   that some experts can specialise in math.  Every document becomes
   ``<s> ... </s>``; documents are shuffled, concatenated and cut into
   ``--seq_len``-token blocks.
3. **Model** - ``MixtralForCausalLM`` from scratch (8 experts, top-2 routing by
   default), trained with AdamW + linear warmup + cosine decay, bf16 autocast on CUDA,
   and Mixtral's load-balancing auxiliary loss (``--aux_coef``).  The experts run through
   transformers' own experts implementations (``--experts_impl``, default ``grouped_mm``).
4. **Evaluation** - held-out perplexity on ``--wiki_heldout`` (first ``--heldout_docs``
   articles) and on GSM8K test answers, a unigram baseline (add-one smoothed unigram
   frequencies of the training tokens) on exactly the same tokens, router load per
   expert, and a few greedy samples.  Everything is written into ``OUT/README.md``
   (the model card, from ``scripts/model_card_template.md``) and ``OUT/train_summary.json``.
5. **Save** - weights in bfloat16 (``model.safetensors``) + tokenizer files, loadable
   with plain ``AutoModelForCausalLM`` / ``AutoTokenizer`` (transformers 4.x and 5.x).

Because the GPU machine cannot see the data folder, the work can be split:

    # on a CPU machine: train the tokenizer and tokenize everything into .carry/
    python scripts/train_moe.py --prepare_only --tokenized_dir .carry
    # on the GPU machine: train from the pre-tokenized data
    python scripts/train_moe.py --tokenized_dir .carry --device cuda --out demo/tiny-moe

Without ``--tokenized_dir`` both steps run in one process.  A CPU smoke test:

    python scripts/train_moe.py --tiny --max_docs 300 --max_steps 3 --batch_size 2 \\
        --device cpu --out /tmp/tiny-moe-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from data import read_texts, save_tokenizer, train_bpe_tokenizer  # noqa: E402

CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
DEFAULT_PROMPTS = [
    "The history of",
    "In mathematics,",
    "Tom has 3 boxes with 12 apples in each box. He gives away 10 apples. How many apples does he have left?\n",
]
TINY = dict(hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)  # --tiny


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else (REPO_ROOT / path)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


# ------------------------------------------------------------------------------- data
def encode_docs(tokenizer, texts: list[str], batch: int = 2000) -> list[list[int]]:
    """Token ids of each text (no special tokens)."""
    backend = tokenizer.backend_tokenizer
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        out.extend(e.ids for e in backend.encode_batch(texts[i: i + batch], add_special_tokens=False))
    return out


def pack_stream(docs_ids: list[list[int]], bos_id: int, eos_id: int) -> np.ndarray:
    """Concatenate ``<s> doc </s>`` for every document into one uint16 stream."""
    stream = np.empty(sum(len(d) + 2 for d in docs_ids), dtype=np.uint16)
    pos = 0
    for d in docs_ids:
        stream[pos] = bos_id
        stream[pos + 1: pos + 1 + len(d)] = d
        stream[pos + 1 + len(d)] = eos_id
        pos += len(d) + 2
    return stream


def read_training_text(args) -> tuple[list[str], list[str]]:
    """Wikipedia articles and GSM8K train problems (question + newline + answer), at most --max_docs each."""
    wiki = read_texts(resolve(args.wiki_train))[: args.max_docs]
    gsm_path = resolve(args.gsm8k_train)
    gsm = [q + "\n" + a for q, a in zip(read_texts(gsm_path, "question"), read_texts(gsm_path, "answer"))]
    return wiki, gsm[: args.max_docs]


def tokenize_training_mix(tokenizer, wiki: list[str], gsm: list[str], args) -> tuple[np.ndarray, int]:
    """The shuffled training stream (GSM8K repeated --gsm8k_repeat times) and how many of its tokens are Wikipedia's."""
    docs = [(d, "wiki") for d in wiki] + [(d, "gsm8k") for d in gsm] * args.gsm8k_repeat
    random.Random(args.seed).shuffle(docs)
    ids = encode_docs(tokenizer, [d for d, _ in docs])
    n_wiki = sum(len(i) + 2 for i, (_, source) in zip(ids, docs) if source == "wiki")
    return pack_stream(ids, tokenizer.bos_token_id, tokenizer.eos_token_id), n_wiki


def tokenize_texts(tokenizer, texts: list[str]) -> np.ndarray:
    return pack_stream(encode_docs(tokenizer, texts), tokenizer.bos_token_id, tokenizer.eos_token_id)


def prepare_data(args, out_dir: Path) -> None:
    """Train the tokenizer and write it, the token streams and meta.json into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    wiki, gsm = read_training_text(args)
    log(f"read {len(wiki)} wiki articles ({sum(map(len, wiki)) / 1e6:.1f}M chars), "
        f"{len(gsm)} GSM8K train problems ({sum(map(len, gsm)) / 1e6:.1f}M chars)")
    tokenizer = train_bpe_tokenizer(wiki + gsm, args.vocab_size, args.seq_len)
    save_tokenizer(tokenizer, out_dir / "tokenizer")
    log(f"trained byte-level BPE tokenizer: vocab {len(tokenizer)} -> {out_dir / 'tokenizer'}")

    train, n_wiki = tokenize_training_mix(tokenizer, wiki, gsm, args)
    held = read_texts(resolve(args.wiki_heldout))[: args.heldout_docs]
    gsm_test = read_texts(resolve(args.gsm8k_test), "answer")
    streams = {"train": train, "wiki_heldout": tokenize_texts(tokenizer, held),
               "gsm8k_test": tokenize_texts(tokenizer, gsm_test)}
    for name, stream in streams.items():
        np.save(out_dir / f"{name}.npy", stream)

    meta = {
        "vocab_size": len(tokenizer), "seed": args.seed,
        "wiki_train": args.wiki_train, "wiki_docs": len(wiki), "wiki_chars": sum(map(len, wiki)),
        "gsm8k_train": args.gsm8k_train, "gsm8k_docs": len(gsm), "gsm8k_repeat": args.gsm8k_repeat,
        "train_tokens": int(train.size), "train_tokens_wiki": int(n_wiki),
        "train_tokens_gsm8k": int(train.size - n_wiki),
        "wiki_heldout": args.wiki_heldout, "heldout_docs": len(held),
        "heldout_tokens": int(streams["wiki_heldout"].size),
        "gsm8k_test": args.gsm8k_test, "gsm8k_test_docs": len(gsm_test),
        "gsm8k_test_tokens": int(streams["gsm8k_test"].size),
        "chars_per_token_wiki": sum(map(len, wiki)) / max(1, n_wiki - 2 * len(wiki)),
        "prepare_command": command_line(),
        "prepare_seconds": round(time.time() - t0, 1),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"tokenized: train {train.size / 1e6:.2f}M tokens "
        f"(wiki {n_wiki / 1e6:.2f}M, gsm8k x{args.gsm8k_repeat} {(train.size - n_wiki) / 1e6:.2f}M), "
        f"held-out wiki {meta['heldout_tokens']} tokens, gsm8k test answers {meta['gsm8k_test_tokens']} tokens "
        f"in {time.time() - t0:.0f}s -> {out_dir}")


def make_blocks(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """(n, seq_len) int64 blocks; the remainder is dropped."""
    n = stream.size // seq_len
    return torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)


@dataclass
class Data:
    """The prepared data: tokenizer, meta.json, the training token stream and (n, seq_len) blocks of each set."""

    tokenizer: object
    meta: dict
    train_stream: np.ndarray  # (tokens,) uint16
    train: torch.Tensor
    wiki_heldout: torch.Tensor
    gsm8k_test: torch.Tensor


def read_prepared(data_dir: Path, args) -> Data:
    """What prepare_data wrote into `data_dir`, in --seq_len blocks (held-out sets capped at --max_eval_blocks)."""
    from transformers import AutoTokenizer

    streams = {name: np.load(data_dir / f"{name}.npy") for name in ("train", "wiki_heldout", "gsm8k_test")}
    blocks = {name: make_blocks(s, args.seq_len) for name, s in streams.items()}
    if args.max_eval_blocks:
        for name in ("wiki_heldout", "gsm8k_test"):
            blocks[name] = blocks[name][: args.max_eval_blocks]
    data = Data(AutoTokenizer.from_pretrained(data_dir / "tokenizer"), json.loads((data_dir / "meta.json").read_text()),
                streams["train"], **blocks)
    log(f"data: {data.train.size(0)} train blocks x {args.seq_len} ({data.train_stream.size / 1e6:.2f}M tokens), "
        f"{data.wiki_heldout.size(0)} held-out wiki blocks, {data.gsm8k_test.size(0)} GSM8K-test blocks")
    return data


def load_data(args) -> Data:
    """The prepared data of --tokenized_dir, or prepared now in a temporary folder."""
    if args.tokenized_dir:
        return read_prepared(resolve(args.tokenized_dir), args)
    with tempfile.TemporaryDirectory(prefix="train_moe_data_") as tmp:
        prepare_data(args, Path(tmp))
        return read_prepared(Path(tmp), args)


# ------------------------------------------------------------------------------ model
def build_config(args, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads, max_position_embeddings=args.seq_len,
        num_local_experts=args.num_experts, num_experts_per_tok=args.top_k, router_aux_loss_coef=args.aux_coef,
        output_router_logits=True, tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.02,
        sliding_window=None, attention_dropout=0.0, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        use_cache=True,
    )


def build_model(args, tokenizer, device: torch.device):
    """A freshly initialised (seeded) MixtralForCausalLM in training mode, experts through --experts_impl."""
    from transformers import MixtralForCausalLM

    set_seed(args.seed)
    model = MixtralForCausalLM(build_config(args, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id))
    model.set_experts_implementation(args.experts_impl)
    return model.to(device).train()


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    cfg = model.config
    per_expert = expert // (cfg.num_hidden_layers * cfg.num_local_experts)
    active = total - expert + cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
    return {"total": total, "experts": expert, "embedding": model.get_input_embeddings().weight.numel(),
            "per_expert": per_expert, "active_per_token": active}


def pick_device(name: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device, mixed_precision: bool = True):
    """bf16 autocast on CUDA when mixed_precision; full float32 otherwise."""
    if mixed_precision and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


# --------------------------------------------------------------------------- training
def lr_at(step: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to --min_lr_ratio * --lr at --max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    min_lr = args.lr * args.min_lr_ratio
    return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, args, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def batch_indices(n_blocks: int, batch_size: int, seed: int):
    """Endless (epoch, block indices) batches: blocks in a seeded random order, reshuffled every epoch."""
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        order = torch.randperm(n_blocks, generator=gen)
        for start in range(0, n_blocks - batch_size + 1, batch_size):
            yield epoch, order[start: start + batch_size]
        epoch += 1


def train(model, data: Data, args, device: torch.device) -> dict:
    """--max_steps optimizer steps; returns the logged history, tokens seen and training seconds."""
    opt = make_optimizer(model, args, fused=device.type == "cuda")
    batches = batch_indices(data.train.size(0), args.batch_size, args.seed)
    history, tokens_seen, last_log = [], 0, (0.0, 0)
    start = time.time()
    for step in range(args.max_steps):
        epoch, idx = next(batches)
        x = data.train[idx].to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with autocast(device):
            out = model(input_ids=x, labels=x, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()  # LM loss + aux_coef * load-balancing loss
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens_seen += x.numel()
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.max_steps:
            aux = out.aux_loss.item()
            lm = out.loss.item() - args.aux_coef * aux
            elapsed = time.time() - start
            rate = (tokens_seen - last_log[1]) / max(1e-9, elapsed - last_log[0])
            last_log = (elapsed, tokens_seen)
            log(f"step {step + 1}/{args.max_steps} ep {epoch} lm {lm:.4f} aux {aux:.4f} gnorm {gnorm.item():.2f} "
                f"lr {lr_at(step, args):.2e} {rate / 1e3:.0f}k tok/s {elapsed:.0f}s")
            history.append({"step": step + 1, "lm_loss": round(lm, 4), "aux_loss": round(aux, 4),
                            "seconds": round(elapsed, 1)})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            nll, _, _ = evaluate(model, data.wiki_heldout[: args.eval_blocks_during], device, args.eval_batch_size,
                                 mixed_precision=True)
            log(f"  held-out wiki (first {args.eval_blocks_during} blocks): loss {nll:.4f} ppl {math.exp(nll):.1f}")
            history[-1]["heldout_loss_partial"] = round(nll, 4)
    return {"history": history, "tokens_seen": tokens_seen, "train_seconds": time.time() - start}


# ------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, device, batch_size: int, mixed_precision: bool = False):
    """Mean next-token NLL over all blocks, tokens scored, and per-layer expert load (top-k assignment share)."""
    model.eval()
    nll_sum, n_tok = 0.0, 0
    cfg = model.config
    load = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.float64)
    for i in range(0, blocks.size(0), batch_size):
        x = blocks[i: i + batch_size].to(device)
        with autocast(device, mixed_precision):
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1].float()
        nll_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        n_tok += x[:, 1:].numel()
        for layer, rl in enumerate(out.router_logits):
            idx = rl.float().topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
            load[layer] += torch.bincount(idx, minlength=cfg.num_local_experts).double().cpu()
    model.train()
    return nll_sum / max(1, n_tok), n_tok, load / load.sum(dim=1, keepdim=True)


def unigram_nll(train_stream: np.ndarray, blocks: torch.Tensor, vocab_size: int) -> float:
    """Mean NLL of an add-one smoothed unigram model (fit on training tokens) on the
    same target tokens the LM is scored on (positions 1..seq_len-1 of every block)."""
    counts = np.bincount(train_stream.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[blocks[:, 1:].reshape(-1).numpy()].mean())


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], device, max_new_tokens: int) -> list[dict]:
    model.eval()
    samples = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt").to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        new = tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        samples.append({"prompt": p, "completion": new})
    model.train()
    return samples


def evaluate_saved(model, data: Data, args, device: torch.device) -> dict:
    """Held-out perplexities, unigram baselines, router loads and greedy samples of the saved (bf16-rounded)
    weights, computed in float32 with the eager experts loop: reproducible on a CPU."""
    model.to(torch.float32)
    model.set_experts_implementation("eager")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    scores, loads = {}, {}
    for name, blocks in (("wiki", data.wiki_heldout), ("gsm8k", data.gsm8k_test)):
        nll, n_tok, load = evaluate(model, blocks, device, args.eval_batch_size)
        unigram = unigram_nll(data.train_stream, blocks, len(data.tokenizer))
        scores[name] = {"tokens": n_tok, "blocks": blocks.size(0), "nll": nll, "ppl": math.exp(nll),
                        "unigram_ppl": math.exp(unigram)}
        loads[name] = load.round(decimals=4).tolist()
    return {"heldout_wiki": scores["wiki"], "gsm8k_test_answers": scores["gsm8k"],
            "expert_load_wiki": loads["wiki"], "expert_load_gsm8k": loads["gsm8k"],
            "samples": generate_samples(model, data.tokenizer, DEFAULT_PROMPTS, device, args.sample_tokens)}


# ----------------------------------------------------------------------------- output
def save(model, tokenizer, out_dir: Path) -> None:
    """bf16 weights, generation config and tokenizer, loadable with plain transformers (4.x and 5.x)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    log(f"saved bf16 checkpoint to {out_dir}")


def load_table(load: list[list[float]]) -> str:
    """Markdown table of per-layer expert loads."""
    head = "| layer | " + " | ".join(f"e{i}" for i in range(len(load[0]))) + " |\n"
    head += "|---" * (len(load[0]) + 1) + "|\n"
    return head + "".join(f"| {li} | " + " | ".join(f"{v:.2f}" for v in row) + " |\n" for li, row in enumerate(load))


def samples_markdown(samples: list[dict]) -> str:
    return "\n".join(
        f"- prompt `{json.dumps(x['prompt'])[1:-1]}` →\n\n  ```text\n  "
        + (x["prompt"] + x["completion"]).replace("\n", "\n  ") + "\n  ```" for x in samples)


def model_card(s: dict, config) -> str:
    """OUT/README.md: scripts/model_card_template.md filled from the run summary `s` and the model config."""
    m = s["data"]
    return CARD_TEMPLATE.read_text(encoding="utf-8").format(
        s=s, a=s["args"], m=m, pr=s["params"], hw=s["heldout_wiki"], gs=s["gsm8k_test_answers"], config=config,
        wiki_mchars=m["wiki_chars"] / 1e6, train_mtokens=m["train_tokens"] / 1e6,
        train_mtokens_wiki=m["train_tokens_wiki"] / 1e6, train_mtokens_gsm8k=m["train_tokens_gsm8k"] / 1e6,
        safetensors_mb=s["safetensors_bytes"] / 1e6, mtokens_seen=s["tokens_seen"] / 1e6,
        load_wiki=load_table(s["expert_load_wiki"]), load_gsm8k=load_table(s["expert_load_gsm8k"]),
        samples=samples_markdown(s["samples"]))


def make_summary(args, argv, data: Data, model, device, run: dict, results: dict, out_dir: Path, t_start: float):
    final_train_loss = float(np.mean([h["lm_loss"] for h in run["history"][-3:]]))  # mean of the last logged
    return {
        "command": command_line() if argv is None else f"train_moe.main({argv!r})",
        "prepare_command": data.meta.get("prepare_command"),
        "args": vars(args),
        "experts_impl": args.experts_impl,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "params": count_params(model),
        "safetensors_bytes": (out_dir / "model.safetensors").stat().st_size,
        "steps": args.max_steps,
        "tokens_seen": run["tokens_seen"],
        "epochs": run["tokens_seen"] / data.train_stream.size,
        "final_train_loss": final_train_loss,
        "train_seconds": round(run["train_seconds"], 1),
        "total_seconds": round(time.time() - t_start, 1),
        **results,
        "history": run["history"],
        "data": data.meta,
    }


# ------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--wiki_train", default="../shared/data/corpus/wiki_train.jsonl.xz",
                   help="training corpus, JSON lines with a 'text' field (.xz ok); relative to the repo root")
    g.add_argument("--wiki_heldout", default="../shared/data/corpus/wiki_heldout.jsonl.xz",
                   help="held-out corpus for perplexity")
    g.add_argument("--gsm8k_train", default="../shared/data/eval/gsm8k_train.jsonl",
                   help="GSM8K train (question/answer) mixed into the training data")
    g.add_argument("--gsm8k_test", default="../shared/data/eval/gsm8k_test.jsonl",
                   help="GSM8K test; the 'answer' fields are used for perplexity")
    g.add_argument("--gsm8k_repeat", type=int, default=2,
                   help="how many times the GSM8K train documents appear in the training mix")
    g.add_argument("--max_docs", type=int, default=None,
                   help="use at most this many wiki / GSM8K train documents (smoke tests)")
    g.add_argument("--heldout_docs", type=int, default=200, help="held-out wiki articles to evaluate on")
    g.add_argument("--vocab_size", type=int, default=8192, help="BPE vocabulary size (incl. 3 special tokens)")
    g.add_argument("--tokenized_dir", default=None,
                   help="folder with pre-tokenized data (train.npy, wiki_heldout.npy, gsm8k_test.npy, "
                        "meta.json, tokenizer/). With --prepare_only it is written; otherwise it is read "
                        "(and must exist). Without it, the tokenizer is trained in-process.")
    g.add_argument("--prepare_only", action="store_true",
                   help="only train the tokenizer and tokenize the data into --tokenized_dir, then exit")
    g = p.add_argument_group("model")
    g.add_argument("--hidden_size", type=int, default=256)
    g.add_argument("--intermediate_size", type=int, default=192, help="FFN width of each expert")
    g.add_argument("--num_layers", type=int, default=4)
    g.add_argument("--num_heads", type=int, default=8)
    g.add_argument("--num_kv_heads", type=int, default=4)
    g.add_argument("--num_experts", type=int, default=8)
    g.add_argument("--top_k", type=int, default=2)
    g.add_argument("--aux_coef", type=float, default=0.02, help="router load-balancing loss coefficient")
    g.add_argument("--tiny", action="store_true",
                   help="override to a minuscule config (hidden 64, 2 layers, expert FFN 64) for smoke tests")
    g = p.add_argument_group("training")
    g.add_argument("--seq_len", type=int, default=512)
    g.add_argument("--batch_size", type=int, default=128, help="sequences per optimizer step")
    g.add_argument("--max_steps", type=int, default=4000)
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    g.add_argument("--warmup_steps", type=int, default=150)
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--experts_impl", default="grouped_mm", choices=["grouped_mm", "eager"],
                   help="transformers' experts implementation used for training (default: grouped_mm)")
    g.add_argument("--log_every", type=int, default=50)
    g.add_argument("--eval_every", type=int, default=500,
                   help="held-out wiki loss on --eval_blocks_during blocks every N steps (0 = off)")
    g.add_argument("--eval_blocks_during", type=int, default=32)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="demo/tiny-moe", help="output folder for the checkpoint and model card")
    g.add_argument("--eval_batch_size", type=int, default=32)
    g.add_argument("--max_eval_blocks", type=int, default=None,
                   help="cap the number of --seq_len-token blocks per held-out set (default: all)")
    g.add_argument("--sample_tokens", type=int, default=40, help="greedy new tokens per sample prompt")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.prepare_only and not args.tokenized_dir:
        p.error("--prepare_only needs --tokenized_dir")
    if args.tokenized_dir and not args.prepare_only and not (resolve(args.tokenized_dir) / "meta.json").exists():
        p.error(f"{resolve(args.tokenized_dir)} has no meta.json; create it with --prepare_only first")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    set_seed(args.seed)
    if args.prepare_only:
        prepare_data(args, resolve(args.tokenized_dir))
        return
    data = load_data(args)
    device = pick_device(args.device)
    model = build_model(args, data.tokenizer, device)
    n_params = count_params(model)
    log(f"model: {n_params['total'] / 1e6:.2f}M params ({n_params['active_per_token'] / 1e6:.2f}M active/token), "
        f"experts impl {args.experts_impl}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    run = train(model, data, args, device)

    out_dir = resolve(args.out)
    save(model, data.tokenizer, out_dir)
    results = evaluate_saved(model, data, args, device)
    hw, gs = results["heldout_wiki"], results["gsm8k_test_answers"]
    log(f"held-out wiki ppl {hw['ppl']:.2f} (unigram {hw['unigram_ppl']:.1f}) on {hw['tokens']} tokens; "
        f"GSM8K-test-answer ppl {gs['ppl']:.2f} (unigram {gs['unigram_ppl']:.1f}) on {gs['tokens']} tokens")
    for s in results["samples"]:
        log(f"sample: {s['prompt']!r} -> {s['completion']!r}")

    summary = make_summary(args, argv, data, model, device, run, results, out_dir, t_start)
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "README.md").write_text(model_card(summary, model.config), encoding="utf-8")
    log(f"wrote model card; total wall time {summary['total_seconds']:.0f}s (training {run['train_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
