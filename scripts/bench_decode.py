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
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transformers import GenerationConfig  # noqa: E402

from eval.benchmark_speed import (build_random_model, random_init_config, random_prompts, run_samples,  # noqa: E402
                                  summarize)
from method.skip_calibration import weight_ratios  # noqa: E402
from model import DynamicSkipping  # noqa: E402
from model.adapters import find_moe_blocks  # noqa: E402
from model.compile_parts import parse_parts  # noqa: E402
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
    """Per MoE layer, the median of w_j/w_1 over the calibration tokens' routing (method/skip_calibration.py's
    rule: slots ranked by the router's choice scores); a float for top-2 routers, a list for top-k."""
    ratios, handles = {}, []
    for idx, (adapter, block) in find_moe_blocks(model).items():
        def hook(_m, _a, out, idx=idx, adapter=adapter, block=block):
            logits, weights, indices = out
            scores = adapter.chosen_scores(block, logits, indices)
            ratios.setdefault(idx, []).append(weight_ratios(weights, scores).float())
        handles.append(adapter.router(block).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for idx, r in ratios.items():
        med = np.median(torch.cat(r).cpu().numpy().astype(np.float64), axis=0).tolist()  # as skip_calibration
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


COMPILE: tuple[str, ...] = ()  # set by --compile: the parts torch.compile'd in our graph rows
SAVE: Callable[[], None] = lambda: None  # writes the JSON so far (a run cut short keeps its rows)


def measure(rows: list, label: str, model, *, engine: str, impl: str, batch: int, n_batches: int,
            new_tokens: int, seed: int = 0, skipping: DynamicSkipping | None = None,
            compile_parts: tuple[str, ...] | None = None) -> dict:
    model.set_experts_implementation(("skip+" if skipping is not None else "") + impl)
    vocab = model.config.get_text_config().vocab_size
    prompts = random_prompts(batch * (n_batches + 1), 64, vocab, seed)
    config = gen_config(model, new_tokens)
    decoder = None
    parts = COMPILE if compile_parts is None else compile_parts
    if engine == "graph":
        banned = (config.eos_token_id,) if config.eos_token_id is not None else ()
        if impl != "fused":
            parts = ()
        decoder = StaticDecoder(model, batch, 64 + new_tokens, graph=True, banned_token_ids=banned,
                                compile_parts=parts)
    else:
        parts = ()
    t_setup = time.perf_counter()
    model.dynamic_skipping = skipping
    torch.cuda.synchronize()
    with torch.inference_mode():
        samples = run_samples(model, prompts[batch:], config, 1, [0], batch, decoder)
    s = summarize(samples)
    row = {"label": label, "engine": engine, "experts_implementation": impl, "compile": ",".join(parts),
           "batch_size": batch, "row_seconds": time.perf_counter() - t_setup,
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
    SAVE()
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


def profile_step(model, impl: str, skipping: DynamicSkipping | None, steps: int = 4, batch: int = 1) -> dict:
    """CUDA time per kernel (grouped by name) over `steps` replays of the captured decode step.

    Also the step's wall time per replay and the kernels' total: their difference is the time the GPU
    spends between kernels (launch gaps inside the graph)."""
    from torch.profiler import ProfilerActivity, profile

    model.set_experts_implementation(("skip+" if skipping is not None else "") + impl)
    model.dynamic_skipping = skipping
    dec = StaticDecoder(model, batch, 64 + 2 * steps + 2, graph=True, banned_token_ids=(), compile_parts=COMPILE)
    ids = torch.randint(model.config.vocab_size, (batch, 64), device="cuda")
    with torch.inference_mode():
        dec.generate(ids, torch.ones_like(ids), 2)  # prefill, capture, one replay
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):  # decode steps only (the cache has room for them)
                dec.graph.replay()
            torch.cuda.synchronize()
        torch.cuda.synchronize()  # as many further steps (the cache has room), timed without the profiler
        t = time.perf_counter()
        for _ in range(steps):
            dec.graph.replay()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t) * 1e3 / steps
    model.dynamic_skipping = None
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            kernels[ev.key[:90]] = {"ms_per_step": t / 1e3 / steps, "calls_per_step": ev.count / steps}
    total = sum(v["ms_per_step"] for v in kernels.values())
    calls = sum(v["calls_per_step"] for v in kernels.values())
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["ms_per_step"])[:25])
    return {"compile": ",".join(COMPILE), "batch": batch, "step_wall_ms": wall_ms, "kernel_ms_per_step": total,
            "kernels_per_step": calls, "gap_ms_per_step": wall_ms - total, "top_kernels": top}


def prune_first(model, r: int) -> None:
    blocks = find_moe_blocks(model)
    for adapter, block in blocks.values():
        adapter.prune(block, list(range(r)))
    next(iter(blocks.values()))[0].prune_config(model.config, r)


def mixtral(rows: list, extra: dict, n: int, new: int, stock_bs16: bool) -> None:
    config = random_init_config("mixtral-8x7b", {})
    model = build_random_model(config, "cuda", torch.bfloat16, {"experts_implementation": "grouped_mm"})
    register_skipping_implementation("grouped_mm")
    vocab = config.vocab_size
    calib = torch.stack(random_prompts(16, 64, vocab, 123))
    stock = measure(rows, "stock bs1", model, engine="hf", impl="grouped_mm", batch=1, n_batches=n, new_tokens=new)
    measure(rows, "graph+grouped_mm bs1", model, engine="graph", impl="grouped_mm", batch=1, n_batches=n,
            new_tokens=new)
    betas = calibrate_betas(model, calib)
    skip = DynamicSkipping(model, betas)
    ratios = {}
    if COMPILE:  # the same engine without torch.compile, side by side
        b0 = measure(rows, "base bs1, no compile", model, engine="graph", impl="fused", batch=1, n_batches=n,
                     new_tokens=new, compile_parts=())
        skip.enable()
        s0 = measure(rows, "skip bs1, no compile", model, engine="graph", impl="fused", batch=1, n_batches=n,
                     new_tokens=new, skipping=skip, compile_parts=())
        skip.disable()
        ratios["skip_vs_base_bs1_no_compile"] = s0["decode_tokens_per_s"] / b0["decode_tokens_per_s"]
    base = measure(rows, "base bs1", model, engine="graph", impl="fused", batch=1, n_batches=n, new_tokens=new)
    skip.enable()
    skip_row = measure(rows, "skip bs1", model, engine="graph", impl="fused", batch=1, n_batches=n,
                       new_tokens=new, skipping=skip)
    skip.disable()
    ratios.update(base_bs1_vs_stock_bs1=base["decode_tokens_per_s"] / stock["decode_tokens_per_s"],
                  skip_vs_base_bs1=skip_row["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    extra["ratios_mixtral"] = ratios
    extra["profile_base_bs1"] = profile_step(model, "fused", None)
    skip.enable()
    extra["profile_skip_bs1"] = profile_step(model, "fused", skip)
    skip.disable()
    SAVE()
    if stock_bs16:
        measure(rows, "stock bs16", model, engine="hf", impl="grouped_mm", batch=16, n_batches=2, new_tokens=new)
    base16 = measure(rows, "base bs16", model, engine="graph", impl="fused", batch=16, n_batches=2, new_tokens=new)
    extra["profile_base_bs16"] = profile_step(model, "fused", None, batch=16)
    extra["prefill_2048_s_median"] = prefill_times(model, ("grouped_mm", "fused"))
    for r in (6, 4):
        prune_first(model, r)
        gc.collect()
        torch.cuda.empty_cache()
        row16 = measure(rows, f"r{r} bs16", model, engine="graph", impl="fused", batch=16, n_batches=2, new_tokens=new)
        ratios[f"r{r}_vs_base_bs16"] = row16["decode_tokens_per_s"] / base16["decode_tokens_per_s"]
        if r == 6:
            extra["profile_r6_bs16"] = profile_step(model, "fused", None, batch=16)
        row1 = measure(rows, f"r{r} bs1", model, engine="graph", impl="fused", batch=1, n_batches=n, new_tokens=new)
        ratios[f"r{r}_vs_base_bs1"] = row1["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        if r == 4:
            skip = DynamicSkipping(model, calibrate_betas(model, calib))
            skip.enable()
            rs = measure(rows, "r4+skip bs1", model, engine="graph", impl="fused", batch=1, n_batches=n,
                         new_tokens=new, skipping=skip)
            skip.disable()
            ratios["r4_skip_vs_base_bs1"] = rs["decode_tokens_per_s"] / base["decode_tokens_per_s"]
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
    p.add_argument("--stock_bs16", action="store_true", help="also the stock generate row at batch 16 (~90 s)")
    p.add_argument("--compile", default="",
                   help="modules torch.compile'd in our graph rows (model/compile_parts.py), e.g. "
                        "norm,router,attention; default none; with parts, base and skip at bs 1 are also "
                        "measured without them")
    args = p.parse_args()
    global COMPILE, SAVE
    try:
        COMPILE = parse_parts(args.compile)
    except ValueError as e:
        p.error(f"--compile {args.compile}: {e}")
    rows, extra = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "command": " ".join(sys.argv), "compile": args.compile}
    t0 = time.time()

    def save() -> None:
        extra["wall_s"] = time.time() - t0
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"rows": rows, **extra}, indent=1) + "\n")

    SAVE = save
    try:
        mixtral(rows, extra, args.num_batches, args.max_new_tokens, args.stock_bs16)
        if not args.skip_qwen:
            qwen(rows, extra, args.num_batches, args.max_new_tokens)
    finally:
        save()
    print(json.dumps({k: v for k, v in extra.items() if not k.startswith("profile")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
