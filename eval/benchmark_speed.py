"""Generation speed benchmark (the paper's Sec. 4.4 speed-up measurements).

Each Alpaca prompt is generated on its own (batch size 1, or --batch_size prompts together,
left-padded) for exactly --max_new_tokens tokens (EOS is banned until then), and the speed is
total generated tokens / total generation seconds, as in the original code. --engine hf uses
model.generate (the paper's setting); --engine graph decodes greedily with a static KV cache
and one CUDA graph per step (model/static_decode.py), the same tokens. Checkpoints with `betas` in their config
run with dynamic skipping on.

    python eval/benchmark_speed.py --model_name_or_path Mixtral-8x7B-v0.1 --output speed.json
    python eval/benchmark_speed.py --random_init mixtral-8x7b --set num_local_experts=6 --output r6.json

--random_init builds a model of a real shape with random weights (no checkpoint needed):
prompts then come from the Alpaca file when --tokenizer_name_or_path is given, and are
random token ids of --prompt_len tokens otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so that `python eval/benchmark_speed.py` finds the repo's packages

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList, set_seed  # noqa: E402

from huggingface_hub.errors import StrictDataclassError  # noqa: E402

from cli import UsageError, check_output_file, fail, one_line, resolve_device  # noqa: E402
from model import DynamicSkipping, load_model  # noqa: E402
from model.loading import DTYPES, CheckpointError, check_checkpoint  # noqa: E402
from model.static_decode import StaticDecoder  # noqa: E402
from model.compile_parts import parse_parts  # noqa: E402
from model.adapters import MoEError, find_moe_blocks  # noqa: E402
from model.dynamic_skipping import BetasError, check_betas  # noqa: E402

logger = logging.getLogger("benchmark_speed")

DEFAULT_DATA = "data/alpaca_data_cleaned.json"
DATA_URL = "https://huggingface.co/datasets/yahma/alpaca-cleaned"
ALPACA_FORMAT = "a JSON array of {\"instruction\", \"input\", \"output\"} strings, as alpaca_data_cleaned.json"
GIB = 2**30

# Shapes of the released checkpoints' config.json (weights are random): (model_type, config entries).
PRESETS = {
    # MixtralConfig's defaults are the 8x7B shape; the release has 32k positions.
    "mixtral-8x7b": ("mixtral", dict(max_position_embeddings=32768)),
    "mixtral-8x22b": ("mixtral", dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                                      num_attention_heads=48, num_key_value_heads=8, vocab_size=32768,
                                      max_position_embeddings=65536)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                        vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6)),
    "qwen3-235b-a22b": ("qwen3_moe", dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                                          num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                                          head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                          vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6)),
    # DeepSeek-V3's shape without its YaRN rope scaling (positions beyond 4096 do not matter here).
    "deepseek-v3": ("deepseek_v3", dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
                                        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
                                        num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True,
                                        routed_scaling_factor=2.5, q_lora_rank=1536, kv_lora_rank=512,
                                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                        vocab_size=129280, max_position_embeddings=4096)),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (the original script's flags)")
    src.add_argument("--model_name_or_path", default="Mixtral-8x7B-v0.1",
                     help="checkpoint folder or hub id (default: Mixtral-8x7B-v0.1)")
    src.add_argument("--tokenizer_name_or_path", default=None,
                     help="tokenizer to use (default: the checkpoint's); with --random_init, omit it to use "
                          "random prompt ids")
    src.add_argument("--trust_remote_code", action="store_true", help="allow custom code from the checkpoint")
    src.add_argument("--use_fast_tokenizer", action="store_true",
                     help="kept for compatibility: transformers 5 always loads the fast tokenizer")
    src.add_argument("--per_gpu_max_memory", type=int, default=None,
                     help="GiB per GPU for accelerate's device map (needs --device auto)")
    src.add_argument("--cpu_max_memory", type=int, default=None,
                     help="GiB of host memory for accelerate's device map (needs --device auto)")

    gen = p.add_argument_group("generation (the original script's flags)")
    gen.add_argument("--num_samples", type=int, default=10, help="number of Alpaca prompts (default: 10)")
    gen.add_argument("--max_new_tokens", type=int, default=512,
                     help="tokens generated per prompt, exactly: EOS is banned until then (default: 512)")
    gen.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--num_beams", type=int, default=1,
                     help="beams; all of them are returned and counted, as the original did (default: 1)")

    new = p.add_argument_group("added")
    new.add_argument("--data_path", default=None,
                     help=f"Alpaca JSON array of {{instruction, input, output}} (default: {DEFAULT_DATA} under the "
                          f"repo root; get alpaca_data_cleaned.json from {DATA_URL})")
    new.add_argument("--prompt_with_output", action="store_true",
                     help="feed prompt + reference output, as the original script's inputs were (default: prompt)")
    new.add_argument("--device", default=None,
                     help="cuda, cuda:N, cpu, or auto (accelerate's device map over all GPUs); default: the GPU "
                          "when there is one")
    new.add_argument("--dtype", default=None, choices=list(DTYPES),
                     help="default: bfloat16 on GPU (as the paper), float32 on CPU; auto = the checkpoint's")
    new.add_argument("--experts_implementation", default=None, choices=["eager", "grouped_mm", "batched_mm", "fused"],
                     help="experts kernel: transformers' own, or this repo's Triton decode kernels (fused; "
                          "model/fused_experts.py) (default: transformers' choice)")
    new.add_argument("--engine", default="hf", choices=["hf", "graph", "static"],
                     help="hf: model.generate (the paper's setting); graph: greedy decoding with a static KV "
                          "cache, one CUDA graph per decode step (model/static_decode.py); static: the same loop "
                          "without the graph (default: hf)")
    new.add_argument("--compile", default="",
                     help="with --engine graph/static: comma-separated modules torch.compile'd for the decode step "
                          "(model/compile_parts.py): norm, router, attention; "
                          "default: none")
    new.add_argument("--batch_size", type=int, default=1,
                     help="prompts decoded together (left-padded); --num_samples is rounded down to a multiple")
    new.add_argument("--attn_implementation", default=None,
                     help="e.g. sdpa, eager, flash_attention_2 (the original used flash_attention_2); "
                          "default: transformers' choice")
    new.add_argument("--seed", type=int, default=0,
                     help="seed of the prompt sample (the original's random.seed(0)), sampling and random init")
    new.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations (default: 1)")
    new.add_argument("--no_skipping", action="store_true", help="ignore the checkpoint's betas")
    new.add_argument("--betas", default=None,
                     help="dynamic skipping with this beta in every MoE layer, or a JSON dict "
                          "{\"<layer index>\": beta}; overrides a checkpoint's betas")
    new.add_argument("--random_init", default=None, metavar="CONFIG",
                     help=f"random weights of this shape instead of a checkpoint: a config.json (or its folder) or "
                          f"a preset ({', '.join(PRESETS)})")
    new.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a --random_init config entry (JSON value), e.g. num_local_experts=6; repeatable")
    new.add_argument("--prompt_len", type=int, default=128,
                     help="length of the random prompts used with --random_init and no tokenizer (default: 128)")
    new.add_argument("--output", default=None, metavar="FILE.json", help="write every measurement here")
    return p


# ---- arguments ---------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_samples", "max_new_tokens", "num_beams", "prompt_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.overrides and not args.random_init:
        raise UsageError("--set changes the shape of a --random_init model; a checkpoint's shape is fixed")
    if args.betas is not None and args.no_skipping:
        raise UsageError("--betas and --no_skipping contradict each other")
    if (args.per_gpu_max_memory or args.cpu_max_memory) and args.device != "auto":
        raise UsageError("--per_gpu_max_memory/--cpu_max_memory set accelerate's device map: add --device auto")
    if args.random_init and args.device == "auto":
        raise UsageError("--random_init builds the model on one device: use --device cuda, cuda:N or cpu")
    if args.random_init and args.dtype == "auto":
        raise UsageError("--dtype auto means the checkpoint's dtype; --random_init needs a dtype")
    if args.batch_size > args.num_samples:
        raise UsageError(f"--batch_size {args.batch_size} is larger than --num_samples {args.num_samples}")
    if args.engine != "hf" and (args.do_sample or args.num_beams != 1):
        raise UsageError(f"--engine {args.engine} decodes greedily: drop --do_sample / --num_beams or use --engine hf")
    if args.engine != "hf" and args.device == "auto":
        raise UsageError(f"--engine {args.engine} runs the model on one device: use --device cuda or cuda:N")
    try:
        args.compile_parts = parts = parse_parts(args.compile)  # parsed once, used by make_decoder
    except ValueError as e:
        raise UsageError(f"--compile {args.compile}: {e}") from None
    if parts and args.engine == "hf":
        raise UsageError("--compile applies to the static decode step: add --engine graph (GPU) or --engine static")
    check_output_file(args.output, "--output")  # before the model loads, not after the measurements


def resolve_dtype(name: str | None, device: str) -> torch.dtype | str:
    if name is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    return DTYPES[name]


def data_file(args: argparse.Namespace) -> Path:
    path = Path(args.data_path) if args.data_path else REPO / DEFAULT_DATA
    if not path.is_file():
        raise UsageError(f"Alpaca data file {path} not found: download alpaca_data_cleaned.json from {DATA_URL} "
                         f"to {REPO / DEFAULT_DATA} or pass --data_path")
    check_alpaca(path)
    return path


def check_alpaca(path: Path) -> None:
    """The data file holds Alpaca examples. Read here before the slow model load (and again by
    `alpaca_prompts` once the tokenizer exists: a second JSON parse costs well under a second)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"Alpaca data file {path} is not valid JSON ({e}); expected {ALPACA_FORMAT}") from None
    if not isinstance(data, list) or not data:
        raise UsageError(f"Alpaca data file {path} holds {json.dumps(data)[:40]}, not a non-empty JSON array; "
                         f"expected {ALPACA_FORMAT}")
    for n, example in enumerate(data):
        if not isinstance(example, dict) or not all(isinstance(example.get(k), str)
                                                    for k in ("instruction", "input", "output")):
            raise UsageError(f"Alpaca data file {path}: example {n} is {json.dumps(example)[:60]}; "
                             f"expected {ALPACA_FORMAT}")


def check_model_flags(args: argparse.Namespace) -> None:
    """The --random_init config with its --set values, or the checkpoint's folder, config and betas: before
    anything is logged or loaded."""
    if args.random_init:
        random_init_config(args.random_init, parse_overrides(args.overrides))
        return
    try:
        check_checkpoint(args.model_name_or_path, skipping=not args.no_skipping and args.betas is None,
                         trust_remote_code=args.trust_remote_code)
    except OSError as e:  # an unreadable config, or a hub id that is not reachable
        raise UsageError(f"cannot load --model_name_or_path {args.model_name_or_path}: "
                         f"{str(e).strip().splitlines()[0]}") from None


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string, e.g. --set hidden_act=silu
    return out


def parse_betas(text: str | None) -> float | dict | None:
    if text is None:
        return None
    try:
        betas = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"--betas {text!r} is neither a number nor a JSON dict") from None
    if isinstance(betas, dict):
        try:
            check_betas(betas)  # the form; the layers are matched once the model exists
        except BetasError as e:
            raise UsageError(f"--betas: {e}") from None
        return betas
    if isinstance(betas, (int, float)) and not isinstance(betas, bool) and math.isfinite(betas) and betas >= 0:
        return float(betas)
    raise UsageError(f"--betas {text}: expected a finite number >= 0 (0 never skips) or a JSON dict "
                     "{\"<layer index>\": beta}")


# ---- model -------------------------------------------------------------------------------


def random_init_config(spec: str, overrides: dict) -> transformers.PreTrainedConfig:
    if spec in PRESETS:
        model_type, entries = PRESETS[spec]
        config = AutoConfig.for_model(model_type, **entries)
    else:
        try:
            config = AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise UsageError(f"--random_init {spec}: not a preset ({', '.join(PRESETS)}) nor a readable config: "
                             f"{str(e).splitlines()[0]}") from None
    entries = config.to_dict()
    unknown = sorted(set(overrides) - set(entries))
    if unknown:
        raise UsageError(f"--set {', '.join(unknown)}: not in the {config.model_type} config")
    overrides = {key: typed_override(key, value, entries[key], config.model_type) for key, value in overrides.items()}
    # Rebuild rather than setattr, so that entries derived in __init__ follow the overrides.
    try:
        return type(config).from_dict({**entries, **overrides})
    except (TypeError, ValueError, StrictDataclassError) as e:  # the config class's own validators
        raise UsageError(f"--set gives an invalid {config.model_type} config: {one_line(e)}") from None


# JSON types of config entries and how --set names them; bool before int (a bool is an int in Python).
OVERRIDE_TYPES = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"),
                  (list, "a JSON list"), (dict, "a JSON object"))


def typed_override(key: str, value, current, model_type: str):
    """A --set value of the entry's type, in words when it is not (num_local_experts=abc), an integer turned
    into a float for a float entry (rms_norm_eps=1); an entry that is null (unset) takes any value."""
    for kind, name in OVERRIDE_TYPES:
        if isinstance(current, kind):
            ok = isinstance(value, (int, float) if kind is float else kind)
            if kind is not bool:
                ok = ok and not isinstance(value, bool)
            if not ok:
                raise UsageError(f"--set {key}={json.dumps(value)}: {model_type} {key} expects {name} "
                                 f"(now {json.dumps(current)})")
            return float(value) if kind is float else value
    return value


def build_random_model(config, device: str, dtype: torch.dtype, impl_kwargs: dict):
    """A model of this shape with transformers' own random init (normal(0, initializer_range)).

    Built directly on the device: every weight is allocated and initialised there in
    `dtype` (fast on a GPU, no host copy), and buffers such as RoPE's inv_freq are
    computed by the modules' own __init__, so they are exactly a loaded model's.
    """
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **impl_kwargs)
    return model.eval()


def load(args: argparse.Namespace, device: str, dtype) -> tuple:
    """Model and tokenizer (None for random prompts), from a checkpoint or --random_init."""
    impl_kwargs = {k: v for k, v in (("experts_implementation", args.experts_implementation),
                                     ("attn_implementation", args.attn_implementation)) if v is not None}
    if args.random_init:
        config = random_init_config(args.random_init, parse_overrides(args.overrides))
        model = build_random_model(config, device, dtype, impl_kwargs)
        model.dynamic_skipping = None
        tokenizer = None
        if args.tokenizer_name_or_path:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path,
                                                      trust_remote_code=args.trust_remote_code)
        return model, tokenizer
    kwargs = dict(impl_kwargs)
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    max_memory = {i: f"{args.per_gpu_max_memory}GiB" for i in range(torch.cuda.device_count())
                  if args.per_gpu_max_memory}
    if args.cpu_max_memory:
        max_memory["cpu"] = f"{args.cpu_max_memory}GiB"
    if max_memory:
        kwargs["max_memory"] = max_memory
    skipping = not args.no_skipping and args.betas is None  # --betas replaces the checkpoint's betas later
    try:
        return load_model(args.model_name_or_path, device=device, dtype=dtype, skipping=skipping,
                          tokenizer_path=args.tokenizer_name_or_path, **kwargs)
    except OSError as e:  # no such folder / hub id (the hub is not reachable offline)
        raise UsageError(f"cannot load --model_name_or_path {args.model_name_or_path}: "
                         f"{str(e).splitlines()[0]}") from None


def enable_betas(model, betas: float | dict) -> dict:
    """Switch dynamic skipping on with these betas; returns them as a per-layer dict."""
    try:
        if isinstance(betas, float):  # one threshold per skippable rank (ranks 2..k) of every MoE layer
            betas = {str(i): betas if a.top_k(b) == 2 else [betas] * (a.top_k(b) - 1)
                     for i, (a, b) in find_moe_blocks(model).items()}
        model.dynamic_skipping = DynamicSkipping(model, betas).enable()
        return betas
    except ValueError as e:  # includes MoEError (e.g. top-1 routing)
        raise UsageError(f"--betas: {e}") from None


# ---- prompts -----------------------------------------------------------------------------


def alpaca_prompt(example: dict, with_output: bool) -> str:
    if example.get("input"):
        prompt = f"Instruction:\n{example['instruction']}\nInput:\n{example['input']}\nOutput:\n"
    else:
        prompt = f"Instruction:\n{example['instruction']}\nOutput:\n"
    return prompt + example["output"] if with_output else prompt


def alpaca_prompts(path: Path, tokenizer, args: argparse.Namespace) -> tuple[list[torch.Tensor], int]:
    """The original's sample: random.seed(seed); random.sample(data, k); too-long prompts dropped.

    Returns the token ids of the kept prompts and the number dropped.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    examples = random.Random(args.seed).sample(data, k=min(args.num_samples, len(data)))
    limit = tokenizer.model_max_length - args.max_new_tokens
    kept = []
    for ex in examples:
        if len(tokenizer(alpaca_prompt(ex, with_output=False))["input_ids"]) >= limit:
            continue
        ids = tokenizer(alpaca_prompt(ex, args.prompt_with_output))["input_ids"][: tokenizer.model_max_length]
        kept.append(torch.tensor(ids, dtype=torch.long))
    return kept, len(examples) - len(kept)


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab_size, (length,), generator=gen) for _ in range(n)]


def check_prompts(prompts: list[torch.Tensor], model, max_new_tokens: int) -> None:
    if not prompts:
        raise UsageError("no prompt is short enough for --max_new_tokens; lower it")
    vocab = model.config.get_text_config().vocab_size
    if max(int(p.max()) for p in prompts) >= vocab:
        raise UsageError(f"the tokenizer produces ids beyond the model's vocabulary ({vocab}); "
                         "use the model's tokenizer")
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if positions and longest > positions:
        raise UsageError(f"prompt + --max_new_tokens reaches {longest} tokens, "
                         f"beyond the model's {positions} positions")


# ---- timing ------------------------------------------------------------------------------


def model_gpus(model) -> list[int]:
    """Indices of the GPUs holding the model's weights (several with --device auto)."""
    return sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})


def clock(gpus: list[int]) -> float:
    """Wall time after the GPUs' queued work is done (CUDA kernels run asynchronously)."""
    for i in gpus:
        torch.cuda.synchronize(i)
    return time.perf_counter()


class FirstTokenTimer(LogitsProcessor):
    """Records when the first new token's logits exist, i.e. the end of the prefill forward.

    Logits processors run once per step, right after the step's forward pass, so the first
    call marks the prefill's end; the synchronisation happens only there.
    """

    def __init__(self, gpus: list[int]):
        self.gpus = gpus
        self.time: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.time is None:
            self.time = clock(self.gpus)
        return scores


def generation_config(args: argparse.Namespace, model, tokenizer) -> GenerationConfig:
    eos = tokenizer.eos_token_id if tokenizer is not None else model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None else model.config.get_text_config().pad_token_id
    if pad is None:  # as the original: pad with EOS
        pad = eos if eos is not None else 0
    return GenerationConfig(
        num_beams=args.num_beams, num_return_sequences=args.num_beams, do_sample=args.do_sample,
        # min_new_tokens == max_new_tokens bans EOS until the last token: fixed-length outputs.
        min_new_tokens=args.max_new_tokens, max_new_tokens=args.max_new_tokens,
        eos_token_id=eos, pad_token_id=pad)


def pad_left(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (B, P) ids and attention mask, padded on the left as generate expects."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), p, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = x
        mask[i, p - len(x):] = 1
    return ids, mask


def generate_batch(model, prompts: list[torch.Tensor], config: GenerationConfig, gpus: list[int],
                   decoder: StaticDecoder | None = None) -> dict:
    """One timed generation of a batch of prompts; `seconds` spans the whole call."""
    input_ids, attention_mask = pad_left(prompts, config.pad_token_id)
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    start = clock(gpus)
    if decoder is None:
        timer = FirstTokenTimer(gpus)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             logits_processor=LogitsProcessorList([timer]))
        new = out[:, input_ids.shape[1]:]
        t_first = timer.time
    else:
        new, t_first = decoder.generate(input_ids, attention_mask, config.max_new_tokens, clock=lambda: clock(gpus))
    end = clock(gpus)
    if new.shape != (len(prompts) * config.num_return_sequences, config.max_new_tokens):
        raise AssertionError(f"generated {tuple(new.shape)} tokens, expected "
                             f"{len(prompts) * config.num_return_sequences} x {config.max_new_tokens}")
    tokens = new.numel()
    seconds, ttft = end - start, t_first - start
    decode_tokens = new.shape[0] * (new.shape[1] - 1)  # every token but the one the prefill's logits give
    return {"batch_size": len(prompts), "prompt_tokens": int(attention_mask.sum()), "generated_tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "ttft_s": ttft, "decode_tokens": decode_tokens,
            "decode_seconds": seconds - ttft,
            "decode_tokens_per_s": decode_tokens / (seconds - ttft) if decode_tokens else None}


def make_decoder(args: argparse.Namespace, model, prompts: list[torch.Tensor],
                 config: GenerationConfig) -> StaticDecoder | None:
    if args.engine == "hf":
        return None
    max_len = max(len(p) for p in prompts) + config.max_new_tokens
    banned = (config.eos_token_id,) if config.eos_token_id is not None else ()  # min_new_tokens == max_new_tokens
    return StaticDecoder(model, args.batch_size, max_len, graph=args.engine == "graph", banned_token_ids=banned,
                         compile_parts=args.compile_parts)


def run_samples(model, prompts: list[torch.Tensor], config: GenerationConfig, warmup: int, gpus: list[int],
                batch_size: int = 1, decoder: StaticDecoder | None = None) -> list[dict]:
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts) - batch_size + 1, batch_size)]
    for i in range(warmup):  # kernels, allocator, caches and the CUDA graph warm; not measured
        generate_batch(model, batches[i % len(batches)], config, gpus, decoder)
    if model.dynamic_skipping is not None:
        model.dynamic_skipping.reset_stats()
    for i in gpus:
        torch.cuda.reset_peak_memory_stats(i)
    samples = []
    bar = tqdm(batches, desc="generating", unit="batch")
    for batch in bar:
        samples.append(generate_batch(model, batch, config, gpus, decoder))
        bar.set_postfix(tokens=samples[-1]["generated_tokens"], speed=f"{samples[-1]['tokens_per_s']:.2f} tok/s")
    return samples


# ---- report ------------------------------------------------------------------------------


def summarize(samples: list[dict]) -> dict:
    tokens = sum(s["generated_tokens"] for s in samples)
    seconds = sum(s["seconds"] for s in samples)
    decode_tokens = sum(s["decode_tokens"] for s in samples)
    decode_seconds = sum(s["decode_seconds"] for s in samples)
    return {"tokens_per_s": tokens / seconds, "total_tokens": tokens, "total_seconds": seconds,
            "mean_ttft_s": sum(s["ttft_s"] for s in samples) / len(samples),
            "time_per_step_ms": 1000 * decode_seconds / sum(s["decode_tokens"] // s["batch_size"] for s in samples)
            if decode_tokens else None,
            "decode_tokens_per_s": decode_tokens / decode_seconds if decode_tokens else None}


def gpu_memory(gpus: list[int]) -> dict | None:
    if not gpus:
        return None
    devices = [f"cuda:{i}" for i in gpus]
    return {"max_allocated_gib": {d: torch.cuda.max_memory_allocated(d) / GIB for d in devices},
            "max_reserved_gib": {d: torch.cuda.max_memory_reserved(d) / GIB for d in devices}}


def model_shape(model) -> dict:
    cfg = model.config.get_text_config()
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts",
            "num_experts_per_tok", "max_position_embeddings")
    shape = {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}
    try:
        blocks = find_moe_blocks(model)
        shape["moe_layers"] = {str(i): {"experts": a.num_experts(b), "top_k": a.top_k(b)}
                               for i, (a, b) in blocks.items()}
    except MoEError:
        shape["moe_layers"] = {}  # a dense model: still benchmarkable
    return shape


def environment(device: str, gpus: list[int]) -> dict:
    if gpus:
        name = [torch.cuda.get_device_name(i) for i in gpus]
    else:
        name = platform.processor() or platform.machine()
    return {"device": device, "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def skipping_report(model) -> dict | None:
    ctrl = model.dynamic_skipping
    if ctrl is None:
        return None
    return {"betas": model.config.betas, **ctrl.stats()}


def print_summary(result: dict) -> None:
    print(f"{result['num_samples']} samples x {result['args']['max_new_tokens']} new tokens: "
          f"{result['tokens_per_s']:.2f} tokens/s ({result['total_tokens']} tokens in {result['total_seconds']:.2f} s)")
    decode = result["decode_tokens_per_s"]
    print(f"mean time to first token {result['mean_ttft_s'] * 1000:.1f} ms"
          + (f", decode {decode:.2f} tokens/s" if decode else ""))
    if result["skipping"]:
        print(f"skip rate {result['skipping']['skip_rate']:.4f}")
    if result["gpu_memory"]:
        alloc = sum(result["gpu_memory"]["max_allocated_gib"].values())
        reserved = sum(result["gpu_memory"]["max_reserved_gib"].values())
        print(f"peak GPU memory: {alloc:.2f} GiB allocated, {reserved:.2f} GiB reserved")
    print(f"model: {result['num_parameters'] / 1e9:.3f}B parameters, loaded in {result['load_seconds']:.1f} s")


# ---- main --------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> dict:
    check_args(args)
    device = args.device if args.device == "auto" else str(resolve_device(args.device))  # auto: accelerate's map
    if args.engine == "graph" and not device.startswith("cuda"):
        raise UsageError("--engine graph captures CUDA graphs: use a GPU, or --engine static on the CPU")
    dtype = resolve_dtype(args.dtype, device)
    betas = parse_betas(args.betas)
    needs_data = not args.random_init or args.tokenizer_name_or_path
    path = data_file(args) if needs_data else None  # before the slow model load
    check_model_flags(args)
    set_seed(args.seed)

    logger.info("loading %s on %s", args.random_init or args.model_name_or_path, device)
    start = time.perf_counter()
    model, tokenizer = load(args, device, dtype)
    gpus = model_gpus(model)
    load_seconds = clock(gpus) - start
    logger.info("loaded in %.1f s", load_seconds)
    if betas is not None:
        model.config.betas = enable_betas(model, betas)  # what the report and model_config show

    if tokenizer is not None:
        prompts, dropped = alpaca_prompts(path, tokenizer, args)
    else:
        vocab = model.config.get_text_config().vocab_size
        prompts, dropped = random_prompts(args.num_samples, args.prompt_len, vocab, args.seed), 0
    check_prompts(prompts, model, args.max_new_tokens)

    config = generation_config(args, model, tokenizer)
    decoder = make_decoder(args, model, prompts, config)
    with torch.inference_mode():
        samples = run_samples(model, prompts, config, args.warmup, gpus, args.batch_size, decoder)
    return {
        "num_samples": sum(s["batch_size"] for s in samples), "num_batches": len(samples),
        "batch_size": args.batch_size, "engine": args.engine, "compile": args.compile, "num_dropped_too_long": dropped, **summarize(samples),
        "samples": samples, "gpu_memory": gpu_memory(gpus), "load_seconds": load_seconds,
        "num_parameters": sum(p.numel() for p in model.parameters()), "skipping": skipping_report(model),
        "model": model_shape(model), "experts_implementation": model.config._experts_implementation,
        "attn_implementation": model.config._attn_implementation, "dtype": str(model.dtype).removeprefix("torch."),
        "prompts": "random ids" if tokenizer is None else ("alpaca prompt+output" if args.prompt_with_output
                                                          else "alpaca prompt"),
        "generation_config": config.to_diff_dict(), "environment": environment(device, gpus), "args": vars(args),
        "model_config": model.config.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = benchmark(args)
    except (UsageError, CheckpointError, BetasError, MoEError) as e:
        return fail("benchmark_speed.py", e)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_summary(result)
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO)
    sys.exit(main())
