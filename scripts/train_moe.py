#!/usr/bin/env python
"""Train the project's demo model (a tiny Mixtral-architecture MoE language model) and its testbeds.

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
3. **Model** - from scratch, ``--arch``: ``mixtral`` (``MixtralForCausalLM``, 8 experts, top-2
   routing by default), ``qwen3_moe`` (``Qwen3MoeForCausalLM``: fine-grained experts,
   ``norm_topk_prob``) or ``dense`` (``MistralForCausalLM`` or ``Qwen3ForCausalLM``, ``--dense_family``:
   the dense model of the same active size, FFN width ``--top_k`` x ``--intermediate_size``, every
   other setting the MoE's).  Trained with AdamW + linear warmup + cosine decay, bf16 autocast on
   CUDA, and the Switch/Mixtral load-balancing auxiliary loss (``--aux_coef``; ``--aux_loss global``
   is transformers' own, over all layers' router logits together, ``per_layer`` its mean over the
   layers, which keeps every layer balanced).  The experts run through transformers' own experts
   implementations (``--experts_impl``, default ``grouped_mm``).  ``--preset`` sets the testbeds'
   architecture and sizes (testbed-8x, testbed-64x and their dense twins dense-8x, dense-64x);
   explicit flags override it.
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

Without ``--tokenized_dir`` both steps run in one process.  ``scripts/testbeds.py`` runs the
testbeds' pipeline (prepare, the four trainings at once on one GPU, the method comparison).
A CPU smoke test:

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

from cli import sha256_file  # noqa: E402
from data import read_texts, save_tokenizer, train_bpe_tokenizer  # noqa: E402

CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
DEFAULT_PROMPTS = [
    "The history of",
    "In mathematics,",
    "Tom has 3 boxes with 12 apples in each box. He gives away 10 apples. How many apples does he have left?\n",
]
TINY = dict(hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)  # --tiny
ARCHS = ("mixtral", "qwen3_moe", "dense")
DENSE_FAMILIES = {"mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM"}
MOE_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# The testbeds of issue #10: 8 layers, hidden 512, 8 heads (4 KV heads), and the same active size per
# token in all four (2 x 512 = 8 x 128 = 1024 = the dense FFN width). Step counts: about 160 MFLOP per
# token for each (6 x 23M active matmul parameters + attention), 600 steps x 64 x 512 tokens = 19.7M
# tokens (1.2 epochs of the 16.8M-token stream), about 3.1 PFLOP per run: 2-3 minutes each with the four
# running at once on one H200 if they reach 70-100 TFLOP/s together (the demo reached ~45 on its own at
# hidden 256, docs/demo_model.md). An estimate, not a measurement: the log prints ms/step and TFLOP/s.
_TESTBED = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, seq_len=512, batch_size=64,
                max_steps=600, warmup_steps=60, lr=2e-3, aux_coef=0.02, aux_loss="per_layer",
                experts_impl="grouped_mm_autocast", log_every=25, eval_every=200)
PRESETS = {
    "testbed-8x": dict(_TESTBED, arch="mixtral", num_experts=8, top_k=2, intermediate_size=512),
    "testbed-64x": dict(_TESTBED, arch="qwen3_moe", num_experts=64, top_k=8, intermediate_size=128),
    "dense-8x": dict(_TESTBED, arch="dense", dense_family="mistral", num_experts=8, top_k=2, intermediate_size=512),
    "dense-64x": dict(_TESTBED, arch="dense", dense_family="qwen3", num_experts=64, top_k=8, intermediate_size=128),
}


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
    if args.tokenizer:  # reuse a saved tokenizer (e.g. the demo model's, trained on this same text)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve(args.tokenizer))
        tokenizer.model_max_length = args.seq_len
        save_tokenizer(tokenizer, out_dir / "tokenizer")
        log(f"reused the tokenizer of {args.tokenizer}: vocab {len(tokenizer)} -> {out_dir / 'tokenizer'}")
    else:
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
        "vocab_size": len(tokenizer), "tokenizer": args.tokenizer or "trained on the training text", "seed": args.seed,
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
def is_moe(config) -> bool:
    return config.model_type in MOE_CLASSES


def n_experts(config) -> int:
    """Experts per MoE layer (Mixtral: num_local_experts; Qwen3-MoE: num_experts, also readable under that name)."""
    return config.num_local_experts


def build_config(args, vocab_size: int, bos_id: int, eos_id: int):
    """The --arch config; the dense one has FFN width --top_k x --intermediate_size and every other setting the MoE's."""
    common = dict(vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                  num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
                  head_dim=args.hidden_size // args.num_heads, max_position_embeddings=args.seq_len,
                  tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.02, attention_dropout=0.0,
                  bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True)
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}  # Mixtral's default, for all of them
    if args.arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
            num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads, head_dim=args.hidden_size // args.num_heads,
            max_position_embeddings=args.seq_len, num_local_experts=args.num_experts, num_experts_per_tok=args.top_k,
            router_aux_loss_coef=args.aux_coef, output_router_logits=True, tie_word_embeddings=True,
            rms_norm_eps=1e-5, initializer_range=0.02, sliding_window=None, attention_dropout=0.0,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True,
        )
    if args.arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, **rope, intermediate_size=args.top_k * args.intermediate_size,
                              moe_intermediate_size=args.intermediate_size, num_experts=args.num_experts,
                              num_experts_per_tok=args.top_k, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=[], router_aux_loss_coef=args.aux_coef, output_router_logits=True,
                              use_sliding_window=False)
    if args.dense_family == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**common, **rope, intermediate_size=args.top_k * args.intermediate_size,
                             sliding_window=None)
    from transformers import Qwen3Config

    return Qwen3Config(**common, **rope, intermediate_size=args.top_k * args.intermediate_size,
                       use_sliding_window=False)


def build_model(args, tokenizer, device: torch.device):
    """A freshly initialised (seeded) model of --arch in training mode, the experts through --experts_impl."""
    from transformers import AutoModelForCausalLM

    set_seed(args.seed)
    model = AutoModelForCausalLM.from_config(
        build_config(args, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id))
    if is_moe(model.config):
        register_experts_impl()
        model.set_experts_implementation(args.experts_impl)
    return model.to(device).train()


def count_params(model) -> dict:
    """Total parameters (tied weights once) and those a token runs through: all but the experts it is not routed to."""
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    cfg = model.config
    out = {"total": total, "experts": expert, "embedding": model.get_input_embeddings().weight.numel()}
    if not is_moe(cfg):
        return {**out, "per_expert": None, "active_per_token": total}
    per_expert = expert // (cfg.num_hidden_layers * n_experts(cfg))
    active = total - expert + cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
    return {**out, "per_expert": per_expert, "active_per_token": active}


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token, estimated: 6 x the matrix parameters a token runs through (the output layer
    included, the embedding lookup not) + 6 x layers x seq_len x attention width (causal QK^T and AV)."""
    cfg = model.config
    params = count_params(model)
    matmul = params["active_per_token"] - (0 if cfg.tie_word_embeddings else params["embedding"])
    return 6.0 * matmul + 6.0 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim


class _CastExperts:
    """An experts module seen with its weights cast (differentiably) to `dtype`; everything else is the module's."""

    def __init__(self, experts, dtype):
        self._experts = experts
        for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
            w = getattr(experts, name, None)
            if isinstance(w, torch.Tensor):
                self.__dict__[name] = w.to(dtype)

    def __getattr__(self, name):
        return getattr(self._experts, name)


def autocast_grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm experts forward, with the expert weights cast to the autocast dtype.

    torch's grouped GEMM is not autocast-aware: with float32 master weights transformers runs it in float32
    (on CUDA the slow per-expert fallback). Cast to bfloat16 it takes the grouped-GEMM kernel, as autocast
    would run a Linear. Without autocast it is transformers' grouped_mm unchanged."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    device_type = hidden_states.device.type
    if not torch.is_autocast_enabled(device_type):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    cast = _CastExperts(self, torch.get_autocast_dtype(device_type))
    return grouped_mm_experts_forward(cast, hidden_states, top_k_index, top_k_weights)


def register_experts_impl() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("grouped_mm_autocast", autocast_grouped_mm_forward)


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


def balance_loss(model, router_logits) -> torch.Tensor:
    """The family's own load-balancing loss (transformers' load_balancing_loss_func: n_experts x sum_e f_e P_e,
    top-k assignment share f, mean router probability P), each layer on its own, averaged over the layers
    (--aux_loss per_layer; --aux_loss global is the model's own aux_loss over all layers' tokens together)."""
    balancing = sys.modules[type(model).__module__].load_balancing_loss_func
    cfg = model.config
    return torch.stack([balancing((rl,), n_experts(cfg), cfg.num_experts_per_tok) for rl in router_logits]).mean()


def training_loss(model, x: torch.Tensor, args):
    """(loss, LM loss, aux loss or None, router logits or None) of one batch: loss = LM + --aux_coef x aux.

    --aux_loss global is the model's own aux_loss (what transformers adds to its loss when given labels);
    per_layer is balance_loss's mean over the layers."""
    moe = is_moe(model.config)
    out = model(input_ids=x, use_cache=False, **({"output_router_logits": True} if moe else {}))
    lm = model.loss_function(logits=out.logits, labels=x, vocab_size=model.config.vocab_size)
    if not moe:
        return lm, lm, None, None
    aux = out.aux_loss if args.aux_loss == "global" else balance_loss(model, out.router_logits)
    return lm + args.aux_coef * aux, lm, aux, out.router_logits


@torch.no_grad()
def router_load(router_logits, top_k: int, n: int) -> torch.Tensor:
    """(layers, n_experts) share of each layer's top-k assignments that each expert receives."""
    counts = torch.stack([torch.bincount(rl.float().topk(top_k, dim=-1).indices.reshape(-1), minlength=n)
                          for rl in router_logits]).double().cpu()
    return counts / counts.sum(dim=1, keepdim=True)


def train(model, data: Data, args, device: torch.device) -> dict:
    """--max_steps optimizer steps (fewer when --time_limit_s runs out first); returns the logged history, tokens
    seen, steps done and training seconds. Logs ms/step, tokens/s and estimated TFLOP/s, and for a MoE each
    layer's router load (least and most loaded expert, as multiples of the uniform share)."""
    opt = make_optimizer(model, args, fused=device.type == "cuda")
    batches = batch_indices(data.train.size(0), args.batch_size, args.seed)
    flops = flops_per_token(model, args.seq_len)
    cfg = model.config
    history, tokens_seen, last_log, steps_done = [], 0, (0.0, 0, 0), 0
    start = time.time()
    for step in range(args.max_steps):
        epoch, idx = next(batches)
        x = data.train[idx].to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with autocast(device):
            loss, lm_loss, aux_loss, router_logits = training_loss(model, x, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # LM loss + aux_coef * load-balancing loss
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens_seen += x.numel()
        steps_done = step + 1
        out_of_time = bool(args.time_limit_s) and time.time() - start > args.time_limit_s
        if steps_done % args.log_every == 0 or steps_done in (1, 10) or steps_done == args.max_steps or out_of_time:
            lm = lm_loss.item()
            aux = aux_loss.item() if aux_loss is not None else 0.0
            elapsed = time.time() - start
            dt, dtok, dsteps = elapsed - last_log[0], tokens_seen - last_log[1], steps_done - last_log[2]
            last_log = (elapsed, tokens_seen, steps_done)
            ms = 1e3 * dt / max(1, dsteps)
            eta = (args.max_steps - steps_done) * ms / 1e3
            aux_text = f"aux {aux:.4f} " if aux_loss is not None else ""
            log(f"step {steps_done}/{args.max_steps} ep {epoch} lm {lm:.4f} {aux_text}gnorm {gnorm.item():.2f} "
                f"lr {lr_at(step, args):.2e} {ms:.0f} ms/step {dtok / max(1e-9, dt) / 1e3:.0f}k tok/s "
                f"{flops * dtok / max(1e-9, dt) / 1e12:.1f} TFLOP/s {elapsed:.0f}s ETA {eta:.0f}s")
            record = {"step": steps_done, "lm_loss": round(lm, 4), "seconds": round(elapsed, 1), "ms_per_step": round(ms, 1)}
            if aux_loss is not None:
                record["aux_loss"] = round(aux, 4)
            if router_logits is not None:
                load = router_load(router_logits, cfg.num_experts_per_tok, n_experts(cfg)) * n_experts(cfg)
                record["load_min_max"] = [[round(float(r.min()), 3), round(float(r.max()), 3)] for r in load]
                log("  router load per layer (least/most loaded expert, x uniform): "
                    + " ".join(f"{a:.2f}/{b:.2f}" for a, b in record["load_min_max"]))
            history.append(record)
        if out_of_time:
            log(f"--time_limit_s {args.time_limit_s:g} reached: stopping after step {steps_done} of {args.max_steps}")
            break
        if args.eval_every and steps_done % args.eval_every == 0 and steps_done < args.max_steps:
            nll, _, _ = evaluate(model, data.wiki_heldout[: args.eval_blocks_during], device, args.eval_batch_size,
                                 mixed_precision=True)
            log(f"  held-out wiki (first {args.eval_blocks_during} blocks): loss {nll:.4f} ppl {math.exp(nll):.1f}")
            history[-1]["heldout_loss_partial"] = round(nll, 4)
    return {"history": history, "tokens_seen": tokens_seen, "steps": steps_done,
            "train_seconds": time.time() - start, "flops_per_token": flops}


# ------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, device, batch_size: int, mixed_precision: bool = False):
    """Mean next-token NLL over all blocks, tokens scored, and per-layer expert load (top-k assignment share;
    None for a dense model)."""
    model.eval()
    nll_sum, n_tok = 0.0, 0
    cfg = model.config
    moe = is_moe(cfg)
    load = torch.zeros(cfg.num_hidden_layers, n_experts(cfg), dtype=torch.float64) if moe else None
    for i in range(0, blocks.size(0), batch_size):
        x = blocks[i: i + batch_size].to(device)
        with autocast(device, mixed_precision):
            out = model(input_ids=x, use_cache=False, **({"output_router_logits": True} if moe else {}))
        logits = out.logits[:, :-1].float()
        nll_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        n_tok += x[:, 1:].numel()
        if moe:
            for layer, rl in enumerate(out.router_logits):
                idx = rl.float().topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
                load[layer] += torch.bincount(idx, minlength=n_experts(cfg)).double().cpu()
    model.train()
    return nll_sum / max(1, n_tok), n_tok, (load / load.sum(dim=1, keepdim=True) if moe else None)


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
    if is_moe(model.config):
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
        loads[name] = load.round(decimals=4).tolist() if load is not None else None
    return {"heldout_wiki": scores["wiki"], "gsm8k_test_answers": scores["gsm8k"],
            "expert_load_wiki": loads["wiki"], "expert_load_gsm8k": loads["gsm8k"],
            "samples": generate_samples(model, data.tokenizer, DEFAULT_PROMPTS, device, args.sample_tokens)}


# ----------------------------------------------------------------------------- output
def save(model, tokenizer, out_dir: Path) -> None:
    """bf16 weights, generation config and tokenizer, loadable with plain transformers (4.x and 5.x)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_moe(model.config):
        model.config.output_router_logits = False
    model.to(torch.bfloat16)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    config_file = out_dir / "config.json"
    config_file.write_text(json.dumps(compat_config(json.loads(config_file.read_text())), indent=2) + "\n")
    save_tokenizer(tokenizer, out_dir)
    log(f"saved bf16 checkpoint to {out_dir}")


def compat_config(config: dict) -> dict:
    """5.x's config.json plus the keys transformers 4.x reads instead (model/checkpoint.py says why): top-level
    `rope_theta` (4.x falls back to its family default without it, 1e4 for Qwen3), `torch_dtype`, and the
    expert count in every spelling (Qwen3-MoE: 5.x writes `num_local_experts`, 4.x reads `num_experts`)."""
    from model.checkpoint import COUNT_KEYS

    out = dict(config)
    rope = out.get("rope_parameters") or {}
    if rope.get("rope_type") == "default" and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if "dtype" in out:
        out["torch_dtype"] = out["dtype"]
    for key in COUNT_KEYS.get(out["model_type"], ()):
        out[key] = config.get("num_local_experts", config.get("num_experts"))
    return out


def load_table(load: list[list[float]]) -> str:
    """Markdown table of per-layer expert loads (one column per expert)."""
    head = "| layer | " + " | ".join(f"e{i}" for i in range(len(load[0]))) + " |\n"
    head += "|---" * (len(load[0]) + 1) + "|\n"
    return head + "".join(f"| {li} | " + " | ".join(f"{v:.2f}" for v in row) + " |\n" for li, row in enumerate(load))


def load_summary_table(load: list[list[float]]) -> str:
    """Markdown table of per-layer load statistics, for many experts (the full loads are in train_summary.json)."""
    n = len(load[0])
    rows = ["| layer | least loaded (x uniform) | most loaded (x uniform) | experts below 1/4 of uniform | "
            "normalised entropy |", "|---|---|---|---|---|"]
    for li, row in enumerate(load):
        p = np.asarray(row, dtype=np.float64)
        nz = p[p > 0]
        entropy = float(-(nz * np.log(nz)).sum() / math.log(n))
        rows.append(f"| {li} | {p.min() * n:.2f} | {p.max() * n:.2f} | {int((p * n < 0.25).sum())} | {entropy:.3f} |")
    return "\n".join(rows) + "\n"


def samples_markdown(samples: list[dict]) -> str:
    return "\n".join(
        f"- prompt `{json.dumps(x['prompt'])[1:-1]}` →\n\n  ```text\n  "
        + (x["prompt"] + x["completion"]).replace("\n", "\n  ") + "\n  ```" for x in samples)


DEMO_INTRO = """A real, if very small, mixture-of-experts language model trained from scratch for this
project's expert pruning / dynamic skipping demo and tests (arXiv 2402.14800).  It uses
the stock `MixtralForCausalLM` architecture, so any code written for Mixtral runs on it
unchanged, and it is small enough to run on a laptop CPU.  It is **not** useful for
anything but demos and tests."""
TESTBED_INTRO = """A testbed for this project's expert pruning / dynamic skipping comparison (arXiv 2402.14800,
issue #10): a small language model trained from scratch, minutes on one GPU, on Wikipedia and
GSM8K, with the stock `{cls}` architecture so that any code written for that family runs on it
unchanged. {role} It is **not** useful for anything but experiments."""
MIXTRAL_LAYOUT = """- On disk the weights use the original Mixtral key layout
  (`model.layers.L.block_sparse_moe.experts.E.w1/w2/w3.weight` = gate/down/up projections,
  router `model.layers.L.block_sparse_moe.gate.weight` [E, H]); transformers 5 fuses them on load
  into `model.layers.L.mlp.experts.gate_up_proj` [E, 2·F, H] and `…mlp.experts.down_proj` [E, H, F],
  router `model.layers.L.mlp.gate.weight`."""


def saved_layer0_keys(out_dir: Path) -> list[str]:
    """Names of layer 0's FFN weights in model.safetensors, experts 0 and 1 only (what the file holds, not the module)."""
    from safetensors import safe_open

    with safe_open(out_dir / "model.safetensors", framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith("model.layers.0.") and "attn" not in k and "norm" not in k]
    return sorted(k for k in keys if not any(f".experts.{e}." in k for e in range(2, 1000)))


def card_parts(s: dict, config, out_dir: Path) -> dict:
    """The card's family-dependent parts: title, intro, architecture, auxiliary loss, router load."""
    a, pr, cls = s["args"], s["params"], s["model_class"]
    rope = config.rope_parameters["rope_theta"]
    attn = (f"{config.num_hidden_layers} layers, hidden size {config.hidden_size},\n"
            f"{config.num_attention_heads} attention heads (head dim {config.head_dim}, "
            f"{config.num_key_value_heads} KV heads)")
    tail = f"RoPE θ = {rope:g},\nmax positions {config.max_position_embeddings}, tied input/output embeddings."
    size = (f"- `model.safetensors`: {s['safetensors_bytes'] / 1e6:.1f} MB, bfloat16, "
            f"sha256 `{s['safetensors_sha256']}`.")
    keys = ", ".join(f"`{k}`" for k in saved_layer0_keys(out_dir))
    moe = is_moe(config)
    if moe:
        arch = (f"`{cls}`: {attn},\n**{n_experts(config)} experts per layer, top-{config.num_experts_per_tok} "
                f"routing**{', top-k weights renormalised (`norm_topk_prob`)' if getattr(config, 'norm_topk_prob', False) else ''}, "
                f"expert FFN width\n{a['intermediate_size']} (SwiGLU), {tail}\n\n"
                f"- Parameters: **{pr['total']:,}** in total ({pr['embedding']:,} embedding, {pr['experts']:,} in experts,\n"
                f"  {pr['per_expert']:,} per expert); {pr['active_per_token']:,} active per token.\n{size}\n")
        arch += MIXTRAL_LAYOUT if config.model_type == "mixtral" else f"- Layer 0's FFN weights on disk (experts 0 and 1 of each kind): {keys}."
    else:
        twin = next((k for k, v in PRESETS.items() if v["arch"] != "dense" and
                     all(v[x] == a[x] for x in ("hidden_size", "num_layers", "intermediate_size", "top_k"))), None)
        arch = (f"`{cls}` (dense): {attn},\n**one SwiGLU FFN of width {config.intermediate_size}** per layer "
                f"(= top-{a['top_k']} x expert width {a['intermediate_size']}: the active size of "
                + (f"its MoE twin `{twin}`" if twin else "the MoE these flags describe") + f"), {tail}\n\n"
                f"- Parameters: **{pr['total']:,}** in total ({pr['embedding']:,} embedding), all active for every token.\n"
                f"{size}\n- Layer 0's FFN weights on disk: {keys}.")
    name = Path(a["out"]).name
    if a.get("preset") is None and config.model_type == "mixtral":
        title, intro, tags = f"{name}: a tiny Mixtral-architecture MoE demo model", DEMO_INTRO, "[mixtral, moe, tiny, demo]"
    else:
        kind = (f"{n_experts(config)} experts, top-{config.num_experts_per_tok}" if moe
                else f"dense, the active size of a top-{a['top_k']} MoE")
        title = f"{name}: a {cls.replace('ForCausalLM', '')}-architecture testbed ({kind})"
        role = ("A real mixture of experts, with its router trained under a load-balancing loss."
                if moe else "The dense baseline of the same active size per token as its MoE twin, "
                            "trained the same way (data, tokenizer, steps, batch, seed).")
        intro = TESTBED_INTRO.format(cls=cls, role=role)
        tags = f"[{config.model_type}, {'moe' if moe else 'dense'}, testbed]"
    if not moe:
        aux = "no auxiliary loss (a dense model has no router)"
    elif a["aux_loss"] == "global":
        aux = (f"{'Mixtral' if config.model_type == 'mixtral' else 'the'} load-balancing loss with coefficient "
               f"{a['aux_coef']}\n  (`output_router_logits=True` while training; saved as `False`)")
    else:
        aux = (f"load-balancing loss with coefficient {a['aux_coef']}: transformers' `load_balancing_loss_func`\n"
               f"  on each layer's router logits, averaged over the layers (`--aux_loss per_layer`; balanced value "
               f"{config.num_experts_per_tok})")
    if not moe:
        router = ""
    else:
        table = load_table if n_experts(config) <= 16 else load_summary_table
        what = ("share of top-{k} assignments per expert" if n_experts(config) <= 16 else
                "share of top-{k} assignments per expert, summarised per layer; every expert's share is in "
                "`train_summary.json`").format(k=config.num_experts_per_tok)
        router = (f"Router load ({what}) on held-out Wikipedia:\n\n{table(s['expert_load_wiki'])}\n"
                  f"and on GSM8K test answers:\n\n{table(s['expert_load_gsm8k'])}\n")
    stopped = ""
    if s["steps"] < a["max_steps"]:
        stopped = (f"; stopped by `--time_limit_s {a['time_limit_s']:g}` after {s['steps']} of the {a['max_steps']} "
                   f"planned steps, so the learning rate had not decayed to its end")
    origin = ("trained on the training text above" if not s["data"].get("tokenizer") or
              s["data"]["tokenizer"].startswith("trained") else f"the tokenizer of `{s['data']['tokenizer']}`, reused")
    return {"title": title, "intro": intro, "tags": tags, "load_path": a["out"], "architecture": arch,
            "aux_text": aux, "router_load": router, "stopped": stopped, "tokenizer_origin": origin}


def model_card(s: dict, config, out_dir: Path) -> str:
    """OUT/README.md: scripts/model_card_template.md filled from the run summary `s` and the model config."""
    m = s["data"]
    return CARD_TEMPLATE.read_text(encoding="utf-8").format(
        s=s, a=s["args"], m=m, pr=s["params"], hw=s["heldout_wiki"], gs=s["gsm8k_test_answers"], config=config,
        wiki_mchars=m["wiki_chars"] / 1e6, train_mtokens=m["train_tokens"] / 1e6,
        train_mtokens_wiki=m["train_tokens_wiki"] / 1e6, train_mtokens_gsm8k=m["train_tokens_gsm8k"] / 1e6,
        mtokens_seen=s["tokens_seen"] / 1e6, samples=samples_markdown(s["samples"]),
        **card_parts(s, config, out_dir))


def make_summary(args, argv, data: Data, model, device, run: dict, results: dict, out_dir: Path, t_start: float):
    final_train_loss = float(np.mean([h["lm_loss"] for h in run["history"][-3:]]))  # mean of the last logged
    return {
        "command": command_line() if argv is None else f"train_moe.main({argv!r})",
        "prepare_command": data.meta.get("prepare_command"),
        "args": vars(args),
        "arch": args.arch,
        "preset": args.preset,
        "model_class": type(model).__name__,
        "experts_impl": args.experts_impl if is_moe(model.config) else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "params": count_params(model),
        "flops_per_token": run["flops_per_token"],
        "safetensors_bytes": (out_dir / "model.safetensors").stat().st_size,
        "safetensors_sha256": sha256_file(out_dir / "model.safetensors"),
        "steps": run["steps"],
        "planned_steps": args.max_steps,
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
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="the testbeds' architecture, sizes and training settings (explicit flags override them): "
                        + "; ".join(f"{k}: {v['arch']}" + (f" ({v['dense_family']})" if v["arch"] == "dense" else "")
                                    + f", {v['num_experts']} experts top-{v['top_k']}, {v['num_layers']} layers, hidden "
                                    f"{v['hidden_size']}, expert FFN {v['intermediate_size']}, {v['max_steps']} steps x "
                                    f"{v['batch_size']}" for k, v in PRESETS.items()))
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
    g.add_argument("--tokenizer", default=None,
                   help="reuse this folder's tokenizer instead of training one (e.g. demo/tiny-moe's)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="mixtral", choices=ARCHS,
                   help="mixtral (MixtralForCausalLM), qwen3_moe (Qwen3MoeForCausalLM, norm_topk_prob) or dense: "
                        "the dense model of the same active size as the MoE the other flags describe (FFN width "
                        "--top_k x --intermediate_size, no router)")
    g.add_argument("--dense_family", default="mistral", choices=list(DENSE_FAMILIES),
                   help="--arch dense: MistralForCausalLM (Mixtral's dense twin) or Qwen3ForCausalLM (Qwen3-MoE's)")
    g.add_argument("--hidden_size", type=int, default=256)
    g.add_argument("--intermediate_size", type=int, default=192, help="FFN width of each expert")
    g.add_argument("--num_layers", type=int, default=4)
    g.add_argument("--num_heads", type=int, default=8)
    g.add_argument("--num_kv_heads", type=int, default=4)
    g.add_argument("--num_experts", type=int, default=8)
    g.add_argument("--top_k", type=int, default=2)
    g.add_argument("--aux_coef", type=float, default=0.02, help="router load-balancing loss coefficient")
    g.add_argument("--aux_loss", default="global", choices=["global", "per_layer"],
                   help="global: the model's own aux_loss, over all layers' router logits together (transformers'); "
                        "per_layer: the same loss on each layer, averaged (keeps every layer balanced)")
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
    g.add_argument("--experts_impl", default="grouped_mm", choices=["grouped_mm", "grouped_mm_autocast", "eager"],
                   help="experts implementation used for training (default: transformers' grouped_mm; "
                        "grouped_mm_autocast: the same with the expert weights cast to bf16 under autocast)")
    g.add_argument("--time_limit_s", type=float, default=None,
                   help="stop training after this many seconds even before --max_steps (then save and evaluate)")
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
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    preset = p.parse_known_args(argv)[0].preset
    if preset:  # the preset's values become the defaults: flags given explicitly still win
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.prepare_only and not args.tokenized_dir:
        p.error("--prepare_only needs --tokenized_dir")
    if args.tokenized_dir and not args.prepare_only and not (resolve(args.tokenized_dir) / "meta.json").exists():
        p.error(f"{resolve(args.tokenized_dir)} has no meta.json; create it with --prepare_only first")
    if not 1 <= args.top_k <= args.num_experts:
        p.error(f"--top_k {args.top_k} must be between 1 and --num_experts {args.num_experts}")
    if args.hidden_size % args.num_heads or args.num_heads % args.num_kv_heads:
        p.error(f"--hidden_size {args.hidden_size} must be a multiple of --num_heads {args.num_heads}, "
                f"and --num_heads of --num_kv_heads {args.num_kv_heads}")
    if args.max_steps < 1:
        p.error(f"--max_steps must be at least 1, got {args.max_steps}")
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
    log(f"model: {type(model).__name__}, {n_params['total'] / 1e6:.2f}M params "
        f"({n_params['active_per_token'] / 1e6:.2f}M active/token), "
        + (f"experts impl {args.experts_impl}, aux loss {args.aux_loss} x {args.aux_coef}, " if is_moe(model.config)
           else "dense, ")
        + f"{flops_per_token(model, args.seq_len) / 1e6:.0f} MFLOP/token (est.), device {device}"
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
    (out_dir / "README.md").write_text(model_card(summary, model.config, out_dir), encoding="utf-8")
    log(f"wrote model card; total wall time {summary['total_seconds']:.0f}s (training {run['train_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
