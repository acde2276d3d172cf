#!/usr/bin/env python
"""Train the project's demo model: a tiny Mixtral-architecture MoE language model.

Pipeline (all steps are seeded):

1. **Tokenizer** - a byte-level BPE tokenizer (``tokenizers`` library, ByteLevel
   pre-tokenizer/decoder, special tokens ``<unk>`` ``<s>`` ``</s>``, pad = ``</s>``)
   trained on the training corpus and wrapped in ``PreTrainedTokenizerFast``.  Calling
   the tokenizer prepends ``<s>`` (TemplateProcessing post-processor), like the
   Llama/Mixtral tokenizers do.
2. **Data** - Wikipedia articles (``--wiki_train``, JSON lines with a ``text`` field,
   optionally .xz-compressed) mixed with GSM8K train problems (``--gsm8k_train``,
   ``question + "\\n" + answer`` as one document, repeated ``--gsm8k_repeat`` times) so
   that some experts can specialise in math.  Every document becomes
   ``<s> ... </s>``; documents are shuffled, concatenated and cut into
   ``--seq_len``-token blocks.
3. **Model** - ``MixtralForCausalLM`` from scratch (8 experts, top-2 routing by
   default), trained with AdamW + linear warmup + cosine decay, bf16 autocast on CUDA,
   and Mixtral's load-balancing auxiliary loss (``--aux_coef``).
4. **Evaluation** - held-out perplexity on ``--wiki_heldout`` (first ``--heldout_docs``
   articles) and on GSM8K test answers, a unigram baseline (add-one smoothed unigram
   frequencies of the training tokens) on exactly the same tokens, router load per
   expert, and a few greedy samples.  Everything is written into ``OUT/README.md``
   (the model card) and ``OUT/train_summary.json``.
5. **Save** - weights in bfloat16 (``model.safetensors``) + tokenizer files, loadable
   with plain ``AutoModelForCausalLM`` / ``AutoTokenizer``.

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
import lzma
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK, BOS, EOS = SPECIAL_TOKENS

DEFAULT_PROMPTS = [
    "The history of",
    "In mathematics,",
    "Tom has 3 boxes with 12 apples in each box. He gives away 10 apples. How many apples does he have left?\n",
]


# ----------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def open_text(path: Path):
    path = Path(path)
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path, limit: int | None = None):
    out = []
    with open_text(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            out.append(json.loads(line))
            if limit is not None and len(out) >= limit:
                break
    return out


def resolve(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else (REPO_ROOT / path)


# ------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int, model_max_length: int):
    """Byte-level BPE trained on ``texts``; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def encode_docs(tokenizer, texts, batch: int = 2000) -> list[list[int]]:
    """Token ids of each text (no special tokens)."""
    backend = tokenizer.backend_tokenizer
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        encs = backend.encode_batch(texts[i : i + batch], add_special_tokens=False)
        out.extend(e.ids for e in encs)
    return out


def pack_stream(docs_ids, bos_id: int, eos_id: int) -> np.ndarray:
    """Concatenate ``<s> doc </s>`` for every document into one uint16 stream."""
    total = sum(len(d) + 2 for d in docs_ids)
    stream = np.empty(total, dtype=np.uint16)
    pos = 0
    for d in docs_ids:
        stream[pos] = bos_id
        stream[pos + 1 : pos + 1 + len(d)] = d
        stream[pos + 1 + len(d)] = eos_id
        pos += len(d) + 2
    return stream


def prepare_data(args) -> dict:
    """Train the tokenizer and tokenize train / held-out data into ``args.tokenized_dir``."""
    out_dir = resolve(args.tokenized_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    wiki = [r["text"] for r in read_jsonl(resolve(args.wiki_train), args.max_docs)]
    gsm = read_jsonl(resolve(args.gsm8k_train), args.max_docs)
    gsm_docs = [r["question"] + "\n" + r["answer"] for r in gsm]
    log(f"read {len(wiki)} wiki articles ({sum(map(len, wiki)) / 1e6:.1f}M chars), "
        f"{len(gsm_docs)} GSM8K train problems ({sum(map(len, gsm_docs)) / 1e6:.1f}M chars)")

    tokenizer = train_tokenizer(wiki + gsm_docs, args.vocab_size, args.seq_len)
    tok_dir = out_dir / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    log(f"trained byte-level BPE tokenizer: vocab {len(tokenizer)} -> {tok_dir}")
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    train_docs = [(d, "wiki") for d in wiki] + [(d, "gsm8k") for d in gsm_docs] * args.gsm8k_repeat
    rng = random.Random(args.seed)
    rng.shuffle(train_docs)
    ids = encode_docs(tokenizer, [d for d, _ in train_docs])
    n_wiki_tok = sum(len(i) + 2 for i, (_, src) in zip(ids, train_docs) if src == "wiki")
    train = pack_stream(ids, bos_id, eos_id)
    np.save(out_dir / "train.npy", train)

    held = [r["text"] for r in read_jsonl(resolve(args.wiki_heldout), args.heldout_docs)]
    held_stream = pack_stream(encode_docs(tokenizer, held), bos_id, eos_id)
    np.save(out_dir / "wiki_heldout.npy", held_stream)

    gtest = [r["answer"] for r in read_jsonl(resolve(args.gsm8k_test))]
    gtest_stream = pack_stream(encode_docs(tokenizer, gtest), bos_id, eos_id)
    np.save(out_dir / "gsm8k_test.npy", gtest_stream)

    meta = {
        "vocab_size": len(tokenizer),
        "seed": args.seed,
        "wiki_train": args.wiki_train,
        "wiki_docs": len(wiki),
        "wiki_chars": sum(map(len, wiki)),
        "gsm8k_train": args.gsm8k_train,
        "gsm8k_docs": len(gsm_docs),
        "gsm8k_repeat": args.gsm8k_repeat,
        "train_tokens": int(train.size),
        "train_tokens_wiki": int(n_wiki_tok),
        "train_tokens_gsm8k": int(train.size - n_wiki_tok),
        "wiki_heldout": args.wiki_heldout,
        "heldout_docs": len(held),
        "heldout_tokens": int(held_stream.size),
        "gsm8k_test": args.gsm8k_test,
        "gsm8k_test_docs": len(gtest),
        "gsm8k_test_tokens": int(gtest_stream.size),
        "chars_per_token_wiki": sum(map(len, wiki)) / max(1, n_wiki_tok - 2 * len(wiki)),
        "prepare_command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "prepare_seconds": round(time.time() - t0, 1),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"tokenized: train {train.size / 1e6:.2f}M tokens "
        f"(wiki {n_wiki_tok / 1e6:.2f}M, gsm8k x{args.gsm8k_repeat} {(train.size - n_wiki_tok) / 1e6:.2f}M), "
        f"held-out wiki {held_stream.size} tokens, gsm8k test answers {gtest_stream.size} tokens "
        f"in {time.time() - t0:.0f}s -> {out_dir}")
    return meta


# ----------------------------------------------------------------------------- model
def bf16_grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """MixtralExperts forward with one grouped GEMM per projection, in the autocast dtype.

    ``torch.nn.functional.grouped_mm`` only takes bfloat16 on CUDA, while the master
    weights are float32 during mixed-precision training, so the weights are cast here
    (differentiably).  Numerically it is the same computation as the eager loop.
    """
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = self.gate_up_proj.dtype
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.size(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_sorted, perm = torch.sort(expert_ids, stable=True)
    x = hidden_states[perm // top_k].to(dtype)
    weights = top_k_weights.reshape(-1)[perm]
    counts = torch.bincount(expert_ids_sorted, minlength=self.num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = F.grouped_mm(x, self.gate_up_proj.to(dtype).transpose(-2, -1), offs=offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    h = self.act_fn(gate) * up
    out = F.grouped_mm(h, self.down_proj.to(dtype).transpose(-2, -1), offs=offsets)
    out = out.float() * weights.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    out = out[inv_perm].view(num_tokens, top_k, hidden_dim).sum(dim=1)
    return out.to(hidden_states.dtype)


def register_experts_impl() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("bf16_grouped_mm", bf16_grouped_mm_experts_forward)


def build_config(args, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads,
        max_position_embeddings=args.seq_len,
        num_local_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=True,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        sliding_window=None,
        attention_dropout=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    emb = model.get_input_embeddings().weight.numel()
    cfg = model.config
    per_expert = expert // (cfg.num_hidden_layers * cfg.num_local_experts)
    active = total - expert + cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
    return {"total": total, "experts": expert, "embedding": emb, "per_expert": per_expert,
            "active_per_token": active}


# ---------------------------------------------------------------------------- training
def lr_at(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    progress = min(1.0, progress)
    min_lr = args.lr * args.min_lr_ratio
    return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_blocks(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    n = stream.size // seq_len
    return torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, device, batch_size: int, autocast_dtype=None):
    """Mean next-token NLL over all blocks plus per-layer expert load (top-k assignment share)."""
    model.eval()
    nll_sum, n_tok = 0.0, 0
    cfg = model.config
    load = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.float64)
    for i in range(0, blocks.size(0), batch_size):
        x = blocks[i : i + batch_size].to(device)
        ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else torch.autocast(device.type, enabled=False))
        with ctx:
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        nll_sum += nll.item()
        n_tok += x[:, 1:].numel()
        for layer, rl in enumerate(out.router_logits):
            idx = rl.float().topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
            load[layer] += torch.bincount(idx, minlength=cfg.num_local_experts).double().cpu()
    model.train()
    load = load / load.sum(dim=1, keepdim=True)
    return nll_sum / max(1, n_tok), n_tok, load


def unigram_nll(train_stream: np.ndarray, blocks: torch.Tensor, vocab_size: int) -> float:
    """Mean NLL of an add-one smoothed unigram model (fit on training tokens) on the
    same target tokens the LM is scored on (positions 1..seq_len-1 of every block)."""
    counts = np.bincount(train_stream.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = blocks[:, 1:].reshape(-1).numpy()
    return float(-logp[targets].mean())


def generate_samples(model, tokenizer, prompts, device, max_new_tokens: int):
    model.eval()
    samples = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt").to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        new = tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        samples.append({"prompt": p, "completion": new})
    model.train()
    return samples


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                   help="read at most this many wiki / GSM8K train documents (smoke tests)")
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
    g.add_argument("--experts_impl", default="auto",
                   choices=["auto", "bf16_grouped_mm", "grouped_mm", "eager"],
                   help="MoE expert kernel for training; auto = bf16_grouped_mm on CUDA, eager on CPU")
    g.add_argument("--log_every", type=int, default=50)
    g.add_argument("--eval_every", type=int, default=500,
                   help="held-out wiki loss on --eval_blocks_during blocks every N steps (0 = off)")
    g.add_argument("--eval_blocks_during", type=int, default=32)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="demo/tiny-moe", help="output folder for the checkpoint and model card")
    g.add_argument("--eval_batch_size", type=int, default=32)
    g.add_argument("--max_eval_blocks", type=int, default=None,
                   help="cap the number of 512-token blocks per held-out set (default: all)")
    g.add_argument("--sample_tokens", type=int, default=40, help="greedy new tokens per sample prompt")
    args = p.parse_args(argv)
    t_start = time.time()

    if args.tiny:
        args.hidden_size, args.intermediate_size, args.num_layers = 64, 64, 2
        args.num_heads, args.num_kv_heads = 4, 2
    set_seed(args.seed)

    # ---------------- data
    if args.prepare_only:
        if not args.tokenized_dir:
            p.error("--prepare_only needs --tokenized_dir")
        prepare_data(args)
        return
    if args.tokenized_dir:
        data_dir = resolve(args.tokenized_dir)
        if not (data_dir / "meta.json").exists():
            p.error(f"{data_dir} has no meta.json; create it with --prepare_only first")
    else:
        import tempfile

        data_dir = Path(tempfile.mkdtemp(prefix="train_moe_data_"))
        prepare_data(argparse.Namespace(**{**vars(args), "tokenized_dir": str(data_dir)}))
    meta = json.loads((data_dir / "meta.json").read_text())

    from transformers import AutoTokenizer, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    train_stream = np.load(data_dir / "train.npy")
    held_stream = np.load(data_dir / "wiki_heldout.npy")
    gsm_stream = np.load(data_dir / "gsm8k_test.npy")
    if not args.tokenized_dir:  # in-process mode: the temporary data folder is no longer needed
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)
    train_blocks = make_blocks(train_stream, args.seq_len)
    held_blocks = make_blocks(held_stream, args.seq_len)
    gsm_blocks = make_blocks(gsm_stream, args.seq_len)
    if args.max_eval_blocks:
        held_blocks, gsm_blocks = held_blocks[: args.max_eval_blocks], gsm_blocks[: args.max_eval_blocks]
    log(f"data: {train_blocks.size(0)} train blocks x {args.seq_len} ({train_stream.size / 1e6:.2f}M tokens), "
        f"{held_blocks.size(0)} held-out wiki blocks, {gsm_blocks.size(0)} GSM8K-test blocks")

    # ---------------- device / model
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    register_experts_impl()
    experts_impl = args.experts_impl
    if experts_impl == "auto":
        experts_impl = "bf16_grouped_mm" if use_cuda else "eager"

    config = build_config(args, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    set_seed(args.seed)
    model = MixtralForCausalLM(config)
    model.set_experts_implementation(experts_impl)
    model.to(device)
    model.train()
    if args.experts_impl == "auto" and experts_impl != "eager":
        try:  # probe the grouped kernel once; fall back to the eager loop if it is unavailable
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                model(input_ids=train_blocks[:2].to(device), labels=train_blocks[:2].to(device)).loss.backward()
            model.zero_grad(set_to_none=True)
        except Exception as e:  # noqa: BLE001
            log(f"experts impl {experts_impl} failed ({type(e).__name__}: {e}); using eager")
            experts_impl = "eager"
            model.zero_grad(set_to_none=True)
            model.set_experts_implementation(experts_impl)
    n_params = count_params(model)
    log(f"model: {n_params['total'] / 1e6:.2f}M params ({n_params['active_per_token'] / 1e6:.2f}M active/token), "
        f"experts impl {experts_impl}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if use_cuda else ""))

    decay = [p_ for n, p_ in model.named_parameters() if p_.dim() >= 2]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=use_cuda)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_cuda else \
        (lambda: torch.autocast("cpu", enabled=False))

    # ---------------- training loop (blocks visited in a seeded random order, epoch by epoch)
    gen = torch.Generator().manual_seed(args.seed)
    order, cursor, epoch = torch.randperm(train_blocks.size(0), generator=gen), 0, 0
    history = []
    t_train = time.time()
    loss_ema = None
    tokens_seen = 0
    last_log = (0.0, 0)
    for step in range(args.max_steps):
        if cursor + args.batch_size > order.numel():
            order, cursor, epoch = torch.randperm(train_blocks.size(0), generator=gen), 0, epoch + 1
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        x = train_blocks[idx].to(device, non_blocking=True)
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(step, args)
        with autocast():
            out = model(input_ids=x, labels=x, use_cache=False)
        loss = out.loss  # LM loss + aux_coef * load-balancing loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens_seen += x.numel()
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.max_steps:
            aux = out.aux_loss.item()
            lm = loss.item() - args.aux_coef * aux
            loss_ema = lm if loss_ema is None else 0.9 * loss_ema + 0.1 * lm
            el = time.time() - t_train
            rate = (tokens_seen - last_log[1]) / max(1e-9, el - last_log[0])
            last_log = (el, tokens_seen)
            log(f"step {step + 1}/{args.max_steps} ep {epoch} lm {lm:.4f} aux {aux:.4f} "
                f"gnorm {gnorm.item():.2f} lr {lr_at(step, args):.2e} "
                f"{rate / 1e3:.0f}k tok/s {el:.0f}s")
            history.append({"step": step + 1, "lm_loss": round(lm, 4), "aux_loss": round(aux, 4),
                             "seconds": round(el, 1)})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            nll, _, _ = evaluate(model, held_blocks[: args.eval_blocks_during], device, args.eval_batch_size,
                                 torch.bfloat16 if use_cuda else None)
            log(f"  held-out wiki (first {args.eval_blocks_during} blocks): loss {nll:.4f} ppl {math.exp(nll):.1f}")
            history[-1]["heldout_loss_partial"] = round(nll, 4)
    train_seconds = time.time() - t_train
    # final train loss: mean LM loss of the last few logged points
    last = [h["lm_loss"] for h in history[-3:]]
    final_train_loss = float(np.mean(last))

    # ---------------- save (bf16) and evaluate the SAVED weights in float32
    out_dir = resolve(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.set_experts_implementation("grouped_mm" if not use_cuda else "eager")
    model.to(torch.bfloat16)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log(f"saved bf16 checkpoint to {out_dir}")

    model.to(torch.float32)  # bf16-rounded weights, fp32 compute: reproducible on CPU
    model.set_experts_implementation("eager")
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    held_nll, held_n, held_load = evaluate(model, held_blocks, device, args.eval_batch_size)
    gsm_nll, gsm_n, gsm_load = evaluate(model, gsm_blocks, device, args.eval_batch_size)
    uni_held = unigram_nll(train_stream, held_blocks, len(tokenizer))
    uni_gsm = unigram_nll(train_stream, gsm_blocks, len(tokenizer))
    samples = generate_samples(model, tokenizer, DEFAULT_PROMPTS, device, args.sample_tokens)
    total_seconds = time.time() - t_start
    log(f"held-out wiki ppl {math.exp(held_nll):.2f} (unigram {math.exp(uni_held):.1f}) on {held_n} tokens; "
        f"GSM8K-test-answer ppl {math.exp(gsm_nll):.2f} (unigram {math.exp(uni_gsm):.1f}) on {gsm_n} tokens")
    for s in samples:
        log(f"sample: {s['prompt']!r} -> {s['completion']!r}")

    summary = {
        "command": "python " + " ".join(shlex.quote(a) for a in ([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
        if argv is None else "train_moe.main(" + repr(argv) + ")",
        "prepare_command": meta.get("prepare_command"),
        "args": vars(args),
        "experts_impl": experts_impl,
        "device": torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "params": n_params,
        "safetensors_bytes": (out_dir / "model.safetensors").stat().st_size,
        "steps": args.max_steps,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / train_stream.size,
        "final_train_loss": final_train_loss,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "heldout_wiki": {"tokens": held_n, "blocks": held_blocks.size(0), "nll": held_nll,
                         "ppl": math.exp(held_nll), "unigram_ppl": math.exp(uni_held)},
        "gsm8k_test_answers": {"tokens": gsm_n, "blocks": gsm_blocks.size(0), "nll": gsm_nll,
                               "ppl": math.exp(gsm_nll), "unigram_ppl": math.exp(uni_gsm)},
        "expert_load_wiki": held_load.round(decimals=4).tolist(),
        "expert_load_gsm8k": gsm_load.round(decimals=4).tolist(),
        "samples": samples,
        "history": history,
        "data": meta,
    }
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "README.md").write_text(model_card(summary, config))
    log(f"wrote model card; total wall time {total_seconds:.0f}s (training {train_seconds:.0f}s)")


# ------------------------------------------------------------------------ model card
def model_card(s: dict, config) -> str:
    a, m, pr = s["args"], s["data"], s["params"]
    hw, gs = s["heldout_wiki"], s["gsm8k_test_answers"]
    mb = s["safetensors_bytes"] / 1e6

    def load_table(load):
        head = "| layer | " + " | ".join(f"e{i}" for i in range(len(load[0]))) + " |\n"
        head += "|---" * (len(load[0]) + 1) + "|\n"
        return head + "".join(
            f"| {li} | " + " | ".join(f"{v:.2f}" for v in row) + " |\n" for li, row in enumerate(load))

    samples = "\n".join(
        f"- prompt `{json.dumps(x['prompt'])[1:-1]}` →\n\n  ```text\n  "
        + (x["prompt"] + x["completion"]).replace("\n", "\n  ") + "\n  ```" for x in s["samples"])
    return f"""---
license: cc-by-sa-3.0
library_name: transformers
pipeline_tag: text-generation
tags: [mixtral, moe, tiny, demo]
---

# tiny-moe: a tiny Mixtral-architecture MoE demo model

A real, if very small, mixture-of-experts language model trained from scratch for this
project's expert pruning / dynamic skipping demo and tests (arXiv 2402.14800).  It uses
the stock `MixtralForCausalLM` architecture, so any code written for Mixtral runs on it
unchanged, and it is small enough to run on a laptop CPU.  It is **not** useful for
anything but demos and tests.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("demo/tiny-moe")
model = AutoModelForCausalLM.from_pretrained("demo/tiny-moe")  # bf16 weights
```

## Data

- Wikipedia: {m['wiki_docs']} articles ({m['wiki_chars'] / 1e6:.1f}M characters) from
  `{m['wiki_train']}`.
- GSM8K train: {m['gsm8k_docs']} problems, `question + "\\n" + answer` as one document,
  included {m['gsm8k_repeat']}× so that some experts can specialise in math.
- Every document is `<s> … </s>`; documents are shuffled (seed {m['seed']}), concatenated
  and cut into {a['seq_len']}-token blocks.  Training stream: {m['train_tokens'] / 1e6:.2f}M tokens
  (Wikipedia {m['train_tokens_wiki'] / 1e6:.2f}M, GSM8K {m['train_tokens_gsm8k'] / 1e6:.2f}M).

## Tokenizer

Byte-level BPE (`tokenizers`: ByteLevel pre-tokenizer and decoder), vocabulary
{m['vocab_size']} including the special tokens `<unk>`=0, `<s>`=1 (BOS), `</s>`=2 (EOS, also
used as PAD), trained on the training text above ({m['chars_per_token_wiki']:.2f} characters per
token on Wikipedia).  Calling the tokenizer prepends `<s>` (like the Llama/Mixtral
tokenizers); `model_max_length` = {a['seq_len']}.

## Architecture

`MixtralForCausalLM`: {config.num_hidden_layers} layers, hidden size {config.hidden_size},
{config.num_attention_heads} attention heads (head dim {config.head_dim}, {config.num_key_value_heads} KV heads),
**{config.num_local_experts} experts per layer, top-{config.num_experts_per_tok} routing**, expert FFN width
{config.intermediate_size} (SwiGLU), RoPE θ = {config.rope_parameters['rope_theta']:g},
max positions {config.max_position_embeddings}, tied input/output embeddings.

- Parameters: **{pr['total']:,}** in total ({pr['embedding']:,} embedding, {pr['experts']:,} in experts,
  {pr['per_expert']:,} per expert); {pr['active_per_token']:,} active per token.
- `model.safetensors`: {mb:.1f} MB, bfloat16.
- On disk the weights use the original Mixtral key layout
  (`model.layers.L.block_sparse_moe.experts.E.w1/w2/w3.weight` = gate/down/up projections,
  router `model.layers.L.block_sparse_moe.gate.weight` [E, H]); transformers 5 fuses them on load
  into `model.layers.L.mlp.experts.gate_up_proj` [E, 2·F, H] and `…mlp.experts.down_proj` [E, H, F],
  router `model.layers.L.mlp.gate.weight`.

## Training

- {s['steps']} steps × batch {a['batch_size']} × {a['seq_len']} tokens = {s['tokens_seen'] / 1e6:.1f}M tokens seen
  ({s['epochs']:.1f} epochs of the training stream).
- AdamW (β = 0.9/0.95, weight decay {a['weight_decay']}), peak LR {a['lr']:g}, {a['warmup_steps']} warmup steps,
  cosine decay to {a['min_lr_ratio']:g}× peak, gradient clipping {a['grad_clip']}, seed {a['seed']},
  bf16 autocast, Mixtral load-balancing loss with coefficient {a['aux_coef']}
  (`output_router_logits=True` while training; saved as `False`).
- Final train loss (LM cross-entropy, mean of the last logged steps): **{s['final_train_loss']:.3f}**.
- Hardware: {s['device']}; training {s['train_seconds']:.0f} s, whole script {s['total_seconds']:.0f} s
  (wall time, including data loading, evaluation and saving); torch {s['torch']}, transformers {s['transformers']}.

## Evaluation

Perplexity of the saved (bf16) weights computed in float32, over {a['seq_len']}-token blocks
(`<s> doc </s>` documents concatenated, remainder dropped), scoring every token after the
first of each block.  The unigram baseline is an add-one smoothed unigram model fitted on the
training token stream and scored on exactly the same tokens.

| held-out set | tokens scored | model ppl | unigram ppl |
|---|---|---|---|
| Wikipedia (`{m['wiki_heldout']}`, first {m['heldout_docs']} articles) | {hw['tokens']:,} | **{hw['ppl']:.2f}** | {hw['unigram_ppl']:.1f} |
| GSM8K test answers (`{m['gsm8k_test']}`) | {gs['tokens']:,} | **{gs['ppl']:.2f}** | {gs['unigram_ppl']:.1f} |

Router load (share of top-{config.num_experts_per_tok} assignments per expert) on held-out Wikipedia:

{load_table(s['expert_load_wiki'])}
and on GSM8K test answers:

{load_table(s['expert_load_gsm8k'])}
## Greedy samples ({a['sample_tokens']} new tokens)

{samples}

## How it was made

Tokenizer and token ids were made on a CPU machine (the GPU machine cannot see the data):

```bash
{s['prepare_command']}
```

then the model was trained, saved and evaluated ({s['device']}) with:

```bash
{s['command']}
```

## License

The weights are derived from Wikipedia text (CC BY-SA 3.0) and GSM8K (MIT); the model is
distributed under CC BY-SA 3.0 accordingly.  The training code is part of this repository.
"""


if __name__ == "__main__":
    main()
