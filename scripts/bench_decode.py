"""Decode speed of pruning and skipping, every row in one run on one GPU (issue #9's table).

Random-init models of real shapes (eval/benchmark_speed.py presets), bf16, random 64-token
prompts, exactly 128 new tokens. The stock rows are transformers' `generate` with its
`grouped_mm` experts; ours are the static-cache CUDA-graph engine (model/static_decode.py) with
the fused Triton experts (model/fused_experts.py). Pruning is applied in place to the same
weights (the first r experts kept: with random weights any r experts are alike), and skipping
betas are the paper's: the per-layer median of w2/w1 over calibration tokens (random prompts).

    python scripts/bench_decode.py --output docs/results/h200/decode_bench.json

Also reported: peak GPU memory, skip rate, distinct experts touched per layer and step, the
bytes one decode step reads and the bandwidth that implies (against 4.8 TB/s), the prefill time
of a 2048-token prompt (stock grouped_mm vs fused), and a per-kernel profile of one step.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transformers import GenerationConfig  # noqa: E402

from eval.benchmark_speed import (build_random_model, random_init_config, random_prompts, run_samples,  # noqa: E402
                                  summarize)
from method.skip_calibration import weight_ratios  # noqa: E402
from model import DynamicSkipping  # noqa: E402
from model.adapters import find_moe_blocks  # noqa: E402
from model.dynamic_skipping import register_skipping_implementation  # noqa: E402
from model.static_decode import StaticDecoder  # noqa: E402

PEAK_TBS = 4.8


def gen_config(model, new_tokens: int) -> GenerationConfig:
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = eos if eos is not None else 0  # random prompts are never padded
    return GenerationConfig(do_sample=False, num_beams=1, num_return_sequences=1, min_new_tokens=new_tokens,
                            max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)


def calibrate_betas(model, batch: torch.Tensor) -> dict:
    """Per MoE layer, the median of w_j/w_1 over the calibration tokens' routing (method/skip_calibration.py's rule)."""
    ratios, handles = {}, []
    for idx, (adapter, block) in find_moe_blocks(model).items():
        def hook(_m, _a, out, idx=idx):
            ratios.setdefault(idx, []).append(weight_ratios(out[1]).float())
        handles.append(adapter.router(block).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=batch.cuda(), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for idx, r in ratios.items():
        med = torch.cat(r).median(dim=0).values.tolist()
        out[str(idx)] = med[0] if len(med) == 1 else med
    return out


def experts_touched(model, prompts: list[torch.Tensor], batch: int, steps: int = 8) -> float:
    """Mean distinct experts per MoE layer and decode step (eager static loop, a few steps)."""
    counts, handles = [], []
    for adapter, block in find_moe_blocks(model).values():
        n = adapter.num_experts(block)

        def hook(_m, _a, out, n=n):
            if out[2].shape[0] == batch:  # decode steps only (one token per sequence)
                ids = out[2].flatten()
                counts.append(int(torch.unique(ids[ids < n]).numel()))
        handles.append(adapter.router(block).register_forward_hook(hook))
    try:
        dec = StaticDecoder(model, batch, 64 + steps + 1, graph=False)
        ids = torch.stack(prompts[:batch])
        dec.generate(ids, torch.ones_like(ids), steps)
    finally:
        for h in handles:
            h.remove()
    return sum(counts) / len(counts)


def step_bytes(model, touched_per_layer: float) -> dict:
    """Bytes one decode step reads: every non-expert weight but the embedding table, plus the touched experts."""
    blocks = find_moe_blocks(model)
    adapter, block = next(iter(blocks.values()))
    experts = adapter.experts(block)
    per_expert = sum(p[0].numel() * p.element_size() for p in (experts.gate_up_proj, experts.down_proj))
    expert_total = sum(p.numel() * p.element_size() for _, b in blocks.values() for p in adapter.experts(b).parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    dense = total - expert_total - embed.numel() * embed.element_size()
    return {"dense_bytes": dense, "expert_bytes": touched_per_layer * per_expert * len(blocks),
            "bytes": dense + touched_per_layer * per_expert * len(blocks)}


def measure(rows: list, label: str, model, *, engine: str, impl: str, batch: int, n_batches: int,
            new_tokens: int, seed: int = 0, skipping: DynamicSkipping | None = None) -> dict:
    model.set_experts_implementation(("skip+" if skipping is not None else "") + impl)
    vocab = model.config.get_text_config().vocab_size
    prompts = random_prompts(batch * (n_batches + 1), 64, vocab, seed)
    config = gen_config(model, new_tokens)
    decoder = None
    if engine == "graph":
        banned = (config.eos_token_id,) if config.eos_token_id is not None else ()
        decoder = StaticDecoder(model, batch, 64 + new_tokens, graph=True, banned_token_ids=banned)
    model.dynamic_skipping = skipping
    torch.cuda.synchronize()
    with torch.inference_mode():
        samples = run_samples(model, prompts[batch:], config, 1, [0], batch, decoder)
    s = summarize(samples)
    row = {"label": label, "engine": engine, "experts_implementation": impl, "batch_size": batch,
           "experts_per_layer": next(iter(find_moe_blocks(model).values()))[0].num_experts(
               next(iter(find_moe_blocks(model).values()))[1]),
           "tokens_per_s": s["tokens_per_s"], "decode_tokens_per_s": s["decode_tokens_per_s"],
           "time_per_step_ms": s["time_per_step_ms"], "mean_ttft_s": s["mean_ttft_s"],
           "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "skip_rate": skipping.stats()["skip_rate"] if skipping is not None else None}
    k = next(iter(find_moe_blocks(model).values()))[0].top_k(next(iter(find_moe_blocks(model).values()))[1])
    if batch == 1:
        touched = k - (k - 1) * row["skip_rate"] if skipping is not None else k
    else:
        with torch.inference_mode():
            touched = experts_touched(model, prompts, batch)
    b = step_bytes(model, touched)
    row.update(experts_touched_per_layer=touched, bytes_per_step=b["bytes"],
               achieved_tb_s=b["bytes"] / (row["time_per_step_ms"] / 1e3) / 1e12)
    row["fraction_of_peak_bw"] = row["achieved_tb_s"] / PEAK_TBS
    model.dynamic_skipping = None
    del decoder
    torch.cuda.empty_cache()
    rows.append(row)
    print(json.dumps(row), flush=True)
    return row


def prefill_times(model, impls: tuple[str, ...], length: int = 2048, reps: int = 6) -> dict:
    """Seconds per forward of one `length`-token prompt, the implementations interleaved (A B A B ...)."""
    ids = torch.randint(model.config.vocab_size, (1, length), device="cuda")
    times = {impl: [] for impl in impls}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for impl in impls:
                model.set_experts_implementation(impl)
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
                if rep:  # the first round warms up
                    times[impl].append(time.perf_counter() - t)
    return {impl: sorted(v)[len(v) // 2] for impl, v in times.items()}  # medians


def profile_step(model, impl: str, skipping: DynamicSkipping | None, steps: int = 4) -> dict:
    """CUDA time per kernel (grouped by name) over `steps` replays of the captured decode step."""
    from torch.profiler import ProfilerActivity, profile

    model.set_experts_implementation(("skip+" if skipping is not None else "") + impl)
    model.dynamic_skipping = skipping
    dec = StaticDecoder(model, 1, 64 + 2 * steps + 2, graph=True, banned_token_ids=())
    ids = torch.randint(model.config.vocab_size, (1, 64), device="cuda")
    with torch.inference_mode():
        dec.generate(ids, torch.ones_like(ids), 2)  # prefill, capture, one replay
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):  # decode steps only (the cache has room for them)
                dec.graph.replay()
            torch.cuda.synchronize()
    model.dynamic_skipping = None
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            kernels[ev.key[:90]] = {"ms_per_step": t / 1e3 / steps, "calls_per_step": ev.count / steps}
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]["ms_per_step"])[:25])


def prune_first(model, r: int) -> None:
    blocks = find_moe_blocks(model)
    for adapter, block in blocks.values():
        adapter.prune(block, list(range(r)))
    next(iter(blocks.values()))[0].prune_config(model.config, r)


def mixtral(rows: list, extra: dict, n: int, new: int) -> None:
    config = random_init_config("mixtral-8x7b", {})
    model = build_random_model(config, "cuda", torch.bfloat16, {"experts_implementation": "grouped_mm"})
    register_skipping_implementation("grouped_mm")
    vocab = config.vocab_size
    calib = torch.stack(random_prompts(16, 64, vocab, 123))
    measure(rows, "stock bs1", model, engine="hf", impl="grouped_mm", batch=1, n_batches=n, new_tokens=new)
    measure(rows, "graph+grouped_mm bs1", model, engine="graph", impl="grouped_mm", batch=1, n_batches=n,
            new_tokens=new)
    base = measure(rows, "base bs1", model, engine="graph", impl="fused", batch=1, n_batches=n, new_tokens=new)
    betas = calibrate_betas(model, calib)
    skip = DynamicSkipping(model, betas)
    skip.enable()
    skip_row = measure(rows, "skip bs1", model, engine="graph", impl="fused", batch=1, n_batches=n,
                       new_tokens=new, skipping=skip)
    skip.disable()
    extra["profile_base_bs1"] = profile_step(model, "fused", None)
    skip.enable()
    extra["profile_skip_bs1"] = profile_step(model, "fused", skip)
    skip.disable()
    measure(rows, "stock bs16", model, engine="hf", impl="grouped_mm", batch=16, n_batches=2, new_tokens=new)
    base16 = measure(rows, "base bs16", model, engine="graph", impl="fused", batch=16, n_batches=2, new_tokens=new)
    extra["prefill_2048_s_median"] = prefill_times(model, ("grouped_mm", "fused"))
    ratios = {"base_bs1_vs_stock_bs1": base["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"],
              "skip_vs_base_bs1": skip_row["decode_tokens_per_s"] / base["decode_tokens_per_s"]}
    for r in (6, 4):
        prune_first(model, r)
        gc.collect()
        torch.cuda.empty_cache()
        row16 = measure(rows, f"r{r} bs16", model, engine="graph", impl="fused", batch=16, n_batches=2, new_tokens=new)
        ratios[f"r{r}_vs_base_bs16"] = row16["decode_tokens_per_s"] / base16["decode_tokens_per_s"]
        row1 = measure(rows, f"r{r} bs1", model, engine="graph", impl="fused", batch=1, n_batches=n, new_tokens=new)
        ratios[f"r{r}_vs_base_bs1"] = row1["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        if r == 4:
            skip = DynamicSkipping(model, calibrate_betas(model, calib))
            skip.enable()
            rs = measure(rows, "r4+skip bs1", model, engine="graph", impl="fused", batch=1, n_batches=n,
                         new_tokens=new, skipping=skip)
            skip.disable()
            ratios["r4_skip_vs_base_bs1"] = rs["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    extra["ratios_mixtral"] = ratios
    del model
    gc.collect()
    torch.cuda.empty_cache()


def qwen(rows: list, extra: dict, n: int, new: int) -> None:
    config = random_init_config("qwen3-30b-a3b", {})
    model = build_random_model(config, "cuda", torch.bfloat16, {"experts_implementation": "grouped_mm"})
    torch.cuda.reset_peak_memory_stats()
    a = measure(rows, "qwen3 stock bs1", model, engine="hf", impl="grouped_mm", batch=1, n_batches=n, new_tokens=new)
    b = measure(rows, "qwen3 base bs1", model, engine="graph", impl="fused", batch=1, n_batches=n, new_tokens=new)
    c = measure(rows, "qwen3 stock bs16", model, engine="hf", impl="grouped_mm", batch=16, n_batches=1,
                new_tokens=new)
    d = measure(rows, "qwen3 base bs16", model, engine="graph", impl="fused", batch=16, n_batches=1, new_tokens=new)
    extra["ratios_qwen3"] = {"bs1": b["decode_tokens_per_s"] / a["decode_tokens_per_s"],
                             "bs16": d["decode_tokens_per_s"] / c["decode_tokens_per_s"]}
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None)
    p.add_argument("--num_batches", type=int, default=4, help="timed batch-1 prompts per row")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--skip_qwen", action="store_true")
    args = p.parse_args()
    rows, extra = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "command": " ".join(sys.argv)}
    t0 = time.time()
    try:
        mixtral(rows, extra, args.num_batches, args.max_new_tokens)
        if not args.skip_qwen:
            qwen(rows, extra, args.num_batches, args.max_new_tokens)
    finally:
        extra["wall_s"] = time.time() - t0
        result = {"rows": rows, **extra}
        text = json.dumps(result, indent=1)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text + "\n")
    print(json.dumps({k: v for k, v in extra.items() if not k.startswith("profile")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
