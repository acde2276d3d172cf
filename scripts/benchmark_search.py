"""Pruning-search benchmark on real layer shapes with random weights (no checkpoint needed).

Builds the first --layers decoder layers of a preset (eval/benchmark_speed.py's presets:
mixtral-8x7b, mixtral-8x22b, qwen3-30b-a3b, qwen3-235b-a22b, deepseek-v3; DeepSeek-V3's
leading dense layers are turned into MoE layers unless --set first_k_dense_replace=N) with
random weights (initialised on the compute device, then moved to host memory), feeds random
calibration tokens of the paper's size (--n_blocks x --block_size, batches of --batch_size),
and times:

- ours: `layerwise_pruning` / `progressive_pruning` end to end (capture, layer-by-layer
  forwards, statistics, search), per --r and --search;
- baseline (--baseline_layers L): the original code's algorithm on the first L MoE layers:
  MoE inputs and outputs cached in host memory, then one masked-router MoE forward per
  candidate drop set per calibration batch (the library's own experts kernel), losses summed
  in float64 as the paper. Its decision is compared with ours.

Routing statistics of random weights differ from a trained model's, so the decisions mean
nothing; the point is time and memory, which do not depend on the weights' values (the
beam search's statistics depend on the shape and r only: M slots per token, see
method/search.py's stats_bytes_per_token).

Each run records its peak GPU memory (allocated, from after the model was built), its peak
host RSS, the beam search's statistics memory (`statistics_memory` of each layer) and the
per-layer timing (with --profile, its phases).

    python scripts/benchmark_search.py --preset mixtral-8x7b --layers 2 --r 6 4 --baseline_layers 1 \\
        --output search_mixtral.json
    python scripts/benchmark_search.py --preset deepseek-v3 --layers 1 --r 192 --set vocab_size=32000 --profile
    python scripts/benchmark_search.py --preset qwen3-235b-a22b --layers 1 --r 64 --set vocab_size=32000 --profile
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cli import peak_memory, reset_peak_memory  # noqa: E402
from data import make_loader  # noqa: E402
from eval.benchmark_speed import build_random_model, parse_overrides, random_init_config  # noqa: E402
from main import RunConfig  # noqa: E402
from method import METHODS  # noqa: E402
from model.adapters import find_moe_blocks  # noqa: E402
from model.loading import DTYPES  # noqa: E402
from model.profiling import Profile, profiling  # noqa: E402
from model.runner import LayerRunner, capture_io  # noqa: E402

def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_ours(model, loader, method: str, r: int, device: torch.device, args, copy_model: bool = True) -> dict:
    model = copy.deepcopy(model) if copy_model else model
    reset_peak_memory(device)
    cfg = RunConfig(method=method, calib_set="random", model_path="random", r=r, device=str(device),
                    search=args.search, beam_width=args.beam_width, swap_rounds=args.swap_rounds,
                    states_budget_gib=args.states_budget_gib, stats_budget_gib=args.stats_budget_gib)
    profile = Profile(device, phases=args.profile)
    start = sync(device)
    with profiling(profile):
        _, info = METHODS[method](model, loader, cfg)
    seconds = sync(device) - start
    layers = info["layers"]
    keys = ("dropped_experts", "best_loss", "search", "n_candidates", "n_evaluated", "statistics_memory")
    return {"method": method, "r": r, "search": args.search, "seconds": seconds,
            "seconds_per_moe_layer": seconds / len(layers), **peak_memory(device), "timing": profile.report(),
            "layers": {k: {key: v[key] for key in keys if key in v} for k, v in layers.items()}}


@torch.no_grad()
def masked_moe(adapter, block, x: torch.Tensor, dropped: tuple[int, ...]) -> torch.Tensor:
    """The original code's candidate forward: router logits of dropped experts set to -inf."""
    flat = x.reshape(-1, x.shape[-1])
    logits = adapter.router_logits(block, flat).clone()
    logits[:, list(dropped)] = float("-inf")
    w, i = adapter.route(block, logits)
    return adapter.experts(block)(flat, i, w).reshape(x.shape)


@torch.no_grad()
def run_baseline(model, loader, r: int, n_layers: int, device: torch.device) -> dict:
    """The original enumeration on the first n_layers MoE layers (inputs of the unpruned model)."""
    model = copy.deepcopy(model)
    blocks = find_moe_blocks(model)
    runner = LayerRunner(model, device, progress=False)
    states = runner.capture(loader)
    out = {}
    reset_peak_memory(device)
    for idx, layer in runner.iter_layers(desc="baseline"):
        if len(out) == n_layers:
            break
        if idx not in blocks:
            states = [runner.forward(layer, b) for b in states]
            continue
        adapter, block = blocks[idx]
        xs, zs, new_states = [], [], []
        start = sync(device)
        for b in states:  # cache X and Z in host memory, as the original's CacheDataset
            with capture_io(block) as io:
                new_states.append(runner.forward(layer, b))
            xs.append(io["inputs"][0].cpu())
            zs.append(io["outputs"][0].cpu())
        cache_seconds = sync(device) - start
        n = adapter.num_experts(block)
        losses = {}
        start = sync(device)
        for dropped in itertools.combinations(range(n), n - r):
            loss = 0.0
            for x, z in zip(xs, zs):
                z = z.to(device=device, dtype=torch.float64)
                loss += torch.linalg.norm(z - masked_moe(adapter, block, x.to(device), dropped).double()).item()
            losses[dropped] = loss
        enum_seconds = sync(device) - start
        best = min(losses, key=lambda d: (losses[d], list(losses).index(d)))
        out[str(idx)] = {"cache_seconds": cache_seconds, "enumeration_seconds": enum_seconds,
                         "n_candidates": len(losses), "dropped_experts": list(best), "best_loss": losses[best]}
        states = new_states
    return {"r": r, "layers": out, **peak_memory(device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b", help="a preset of eval/benchmark_speed.py or a config.json")
    p.add_argument("--layers", type=int, default=2, help="decoder layers to build (time per layer is reported)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="further config overrides (JSON values)")
    p.add_argument("--n_blocks", type=int, default=128, help="calibration sequences (the paper: 128)")
    p.add_argument("--block_size", type=int, default=2048, help="tokens per sequence (the paper: 2048)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per batch (the paper: 8)")
    p.add_argument("--r", type=int, nargs="+", default=[6, 4], help="kept experts per layer")
    p.add_argument("--methods", nargs="+", default=["layerwise_pruning"],
                   choices=["layerwise_pruning", "progressive_pruning"])
    p.add_argument("--search", default="auto", choices=["auto", "exhaustive", "beam"])
    p.add_argument("--beam_width", type=int, default=4)
    p.add_argument("--swap_rounds", type=int, default=4)
    p.add_argument("--stats_budget_gib", type=float, default=None,
                   help="main.py's flag: GPU memory for the beam search's statistics (default: a quarter of the GPU)")
    p.add_argument("--states_budget_gib", type=float, default=None,
                   help="main.py's flag: GPU memory for the calibration states (default: a quarter of the GPU)")
    p.add_argument("--profile", action="store_true", help="split each layer's time into phases (GPU synchronised)")
    p.add_argument("--baseline_layers", type=int, default=0, help="MoE layers to run the original algorithm on")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=[k for k in DTYPES if k != "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON file for all measurements")
    args = p.parse_args(argv)
    # the runner's per-layer times and the beam search's steps, as they happen (a long search shows its progress)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("method.search").setLevel(logging.DEBUG)

    device = torch.device(args.device)
    overrides = {"num_hidden_layers": args.layers, **parse_overrides(args.overrides)}
    config = random_init_config(args.preset, {})
    if "first_k_dense_replace" in config.to_dict():  # DeepSeek: the benchmarked layers are MoE layers
        overrides.setdefault("first_k_dense_replace", 0)
    config = random_init_config(args.preset, overrides)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    # initialised on the compute device (fast), then kept in host memory: the runner moves one layer at a time
    model = build_random_model(config, str(device), DTYPES[args.dtype], {}).to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    build_seconds = time.perf_counter() - start
    print(f"built {args.preset} with {config.num_hidden_layers} layers ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters) in {build_seconds:.1f} s", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(config.get_text_config().vocab_size, (args.n_blocks, args.block_size), generator=gen)
    loader = make_loader(tokens, args.batch_size)

    result = {"args": vars(args), "build_seconds": build_seconds,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "runs": [], "baseline": []}
    single = len(args.r) * len(args.methods) == 1 and not args.baseline_layers
    for r in args.r:
        for method in args.methods:
            run = run_ours(model, loader, method, r, device, args, copy_model=not single)
            result["runs"].append(run)
            stats = [v["statistics_memory"] for v in run["layers"].values() if "statistics_memory" in v]
            stats_text = "" if not stats else (
                f", beam statistics {max(m['bytes'] for m in stats) / 2**30:.2f} GiB per layer "
                f"({max(m['host_bytes'] for m in stats) / 2**30:.2f} GiB in host memory), "
                f"{max(v['n_evaluated'] for v in run['layers'].values())} sets scored")
            print(f"ours {method} r={r} search={args.search}: {run['seconds']:.1f} s for {len(run['layers'])} MoE "
                  f"layers ({run['seconds_per_moe_layer']:.2f} s/layer), peak GPU "
                  f"{run.get('peak_gpu_allocated_gib', 0):.1f} GiB, host RSS {run['peak_host_rss_gib']:.1f} GiB"
                  f"{stats_text}", flush=True)
            for idx, entry in run["timing"]["layers"].items():
                phases = entry.get("phases_s")
                if phases:
                    print(f"  layer {idx}: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)
        if args.baseline_layers:
            base = run_baseline(model, loader, r, args.baseline_layers, device)
            result["baseline"].append(base)
            for idx, layer in base["layers"].items():
                ours = next(x for x in result["runs"] if x["r"] == r and x["method"] == "layerwise_pruning")
                same = ours["layers"][idx]["dropped_experts"] == layer["dropped_experts"]
                print(f"baseline r={r} layer {idx}: enumeration of {layer['n_candidates']} candidates "
                      f"{layer['enumeration_seconds']:.1f} s (+{layer['cache_seconds']:.1f} s caching X/Z); "
                      f"ours {ours['seconds_per_moe_layer']:.2f} s/layer all included; same decision: {same}; "
                      f"loss ours {ours['layers'][idx]['best_loss']:.6g} vs {layer['best_loss']:.6g}", flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
