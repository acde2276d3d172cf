"""End-to-end pruning benchmark of `main.py` on a real sharded checkpoint with random weights (issue 11).

1. Builds a random-weight model of a preset shape (eval/benchmark_speed.py's presets; default the Mixtral-8x7B
   shape) truncated to --layers decoder layers, initialised on the compute device, and writes it with
   `save_pretrained` as a sharded safetensors checkpoint (the hub's per-expert tensor names, shards of
   --shard_size) with the demo model's tokenizer (8192 ids, model_max_length raised to the block size), into
   --work_dir/model. An existing checkpoint of the same settings is reused (--rebuild to write it again).
2. Calibration text: --calib_path (a C4 JSON-lines file, e.g. carried to the GPU machine), or by default a
   synthetic one written next to the checkpoint: documents of random token ids of the tokenizer, decoded
   (main.py tokenizes them again, as any C4 file; 128 x 2048 tokens need ~2048 such documents).
3. Runs `python main.py` once per --runs entry (LOAD:METHOD:R, e.g. stream:layerwise:6) in a fresh process,
   at --n_blocks x --block_size calibration tokens in batches of --batch_size, with --profile, and records per
   run: the wall time (outside), main.py's own wall time, seconds per decoder layer (the layer walk's per-layer
   times: read, forwards, search, write), the per-layer phase profile, the capture time, peak host RSS and peak
   GPU memory (main.py's figures: the process's peak RSS, allocated GPU memory after loading), the result's
   size, and the decisions. Each result folder is deleted once measured (disk), unless --keep_outputs.

The JSON (--output) is rewritten after every run, so a run cut short by a time limit leaves what was measured;
runs that would start after --time_budget_s seconds are recorded as skipped.

    python3 scripts/bench_streaming.py --layers 4 --output $OUT/bench_streaming.json            # GPU, ~9 min
    python3 scripts/bench_streaming.py --layers 4 --runs stream:layerwise:6 stream:progressive:6 ...
    # CPU smoke test at a tiny size (what tests/test_bench_streaming.py runs):
    python3 scripts/bench_streaming.py --device cpu --layers 2 --n_blocks 4 --block_size 64 --batch_size 2 \\
        --set hidden_size=64 --set intermediate_size=128 --set num_attention_heads=4 --set num_key_value_heads=2 \\
        --runs stream:layerwise:6 in_memory:layerwise:6
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cli import folder_bytes  # noqa: E402

METHODS = {"layerwise": "layerwise_pruning", "progressive": "progressive_pruning"}
DEFAULT_RUNS = [f"{load}:{method}:{r}" for method in ("layerwise", "progressive") for r in (6, 4)
                for load in ("stream", "in_memory")]


def parse_run(spec: str) -> tuple[str, str, int]:
    try:
        load, method, r = spec.split(":")
        if load not in ("stream", "in_memory") or method not in METHODS:
            raise ValueError
        return load, METHODS[method], int(r)
    except ValueError:
        raise SystemExit(f"bench_streaming.py: error: --runs entries are LOAD:METHOD:R with LOAD stream or in_memory "
                         f"and METHOD layerwise or progressive, e.g. stream:layerwise:6; got {spec!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b", help="a preset of eval/benchmark_speed.py or a config.json")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the checkpoint (default 4: ~12 GB)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="further config overrides (JSON values), e.g. to shrink the model for a CPU check")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="LOAD:METHOD:R",
                   help="main.py runs, in order (default: stream and in_memory, layerwise and progressive, r 6 and 4)")
    p.add_argument("--n_blocks", type=int, default=128, help="calibration sequences (the paper: 128)")
    p.add_argument("--block_size", type=int, default=2048, help="tokens per sequence (the paper: 2048)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--calib_path", default=None, help="a C4 JSON-lines file (default: synthetic random-token text)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shard_size", default="5GB", help="shard size of the input checkpoint and of the results")
    p.add_argument("--work_dir", default=str(REPO / "output" / "bench_streaming"),
                   help="checkpoint, calibration text and results (default: output/bench_streaming, git-ignored, "
                        "so that it survives between calls on the GPU machine)")
    p.add_argument("--rebuild", action="store_true", help="write the checkpoint again even if it exists")
    p.add_argument("--no_profile", action="store_true", help="run main.py without --profile (no phase split)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further main.py flags, after all others")
    p.add_argument("--keep_outputs", action="store_true", help="keep each run's result folder")
    p.add_argument("--time_budget_s", type=float, default=560.0,
                   help="start no run after this many seconds (the GPU machine's command limit is 600 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="the JSON report")
    return p


def model_config(args):
    from eval.benchmark_speed import parse_overrides, random_init_config

    overrides = {"num_hidden_layers": args.layers, **parse_overrides(args.overrides)}
    config = random_init_config(args.preset, {})
    if "first_k_dense_replace" in config.to_dict():
        overrides.setdefault("first_k_dense_replace", 0)
    if "max_position_embeddings" in config.to_dict():
        overrides.setdefault("max_position_embeddings", max(config.max_position_embeddings, args.block_size))
    return random_init_config(args.preset, overrides)


def build_checkpoint(args, config, folder: Path) -> dict:
    """The random-weight checkpoint (and the demo tokenizer) in `folder`, unless one of the same settings exists."""
    from transformers import AutoTokenizer

    from eval.benchmark_speed import build_random_model
    from model.loading import DTYPES

    key = hashlib.sha256(json.dumps([config.to_dict(), args.dtype, args.shard_size, args.seed, args.block_size],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = folder / "bench_key.txt"
    if not args.rebuild and stamp.is_file() and stamp.read_text() == key:
        return {"reused": True, "bytes": folder_bytes(folder), "shards": len(list(folder.glob("*.safetensors")))}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = build_random_model(config, args.device, DTYPES[args.dtype], {})
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(folder, max_shard_size=args.shard_size)
    save_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    tokenizer = AutoTokenizer.from_pretrained(REPO / "demo" / "tiny-moe")
    tokenizer.model_max_length = max(args.block_size, 4096)
    tokenizer.save_pretrained(folder)
    stamp.write_text(key)
    return {"reused": False, "parameters": params, "init_s": init_s, "save_s": save_s, "bytes": folder_bytes(folder),
            "shards": len(list(folder.glob("*.safetensors")))}


def synthetic_calibration(args, folder: Path, path: Path) -> Path:
    """JSON lines of decoded random token ids: main.py samples n_blocks * 16 documents and needs n_blocks *
    block_size tokens from them, so each document holds 2 * block_size / 16 ids (re-tokenized text keeps most)."""
    from transformers import AutoTokenizer

    if path.is_file() and not args.rebuild:
        return path
    tok = AutoTokenizer.from_pretrained(folder)
    gen = torch.Generator().manual_seed(args.seed)
    n_docs, length = args.n_blocks * 16 + 16, max(64, 2 * args.block_size // 16)
    special = set(tok.all_special_ids)
    ids = torch.randint(0, len(tok), (n_docs, length), generator=gen).tolist()
    with open(path, "w") as f:
        for row in ids:
            f.write(json.dumps({"text": tok.decode([i for i in row if i not in special])}) + "\n")
    return path


def run_main(args, model_dir: Path, calib: Path, load: str, method: str, r: int, out_dir: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "main.py"), "--method", method, "--r", str(r), "--calib_set", "c4",
           "--calib_path", str(calib), "--model_path", str(model_dir), "--output_path", str(out_dir),
           "--n_blocks_for_stat", str(args.n_blocks), "--max_block_size", str(args.block_size),
           "--batch_size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype, "--load", load,
           "--max_shard_size", args.shard_size, "--seed", str(args.seed),
           *([] if args.no_profile else ["--profile"]), *args.extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    entry = {"load": load, "method": method, "r": r, "command": " ".join(cmd[1:]), "wall_s": wall,
             "returncode": done.returncode}
    if done.returncode != 0:
        entry["stderr_tail"] = done.stderr[-4000:]
        return entry
    (result,) = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    info = json.loads((result / "pruning_info.json").read_text())
    timing = info["timing"]
    layers = timing["layers"]
    entry.update({
        "main_wall_time_s": info["wall_time_s"],
        "loading": info["loading"],
        "seconds_per_layer": timing["layers_total_s"] / len(layers),
        "layers_total_s": timing["layers_total_s"],
        "capture_s": timing["capture_s"],
        "peak_host_rss_gib": info["peak_host_rss_gib"],
        "peak_gpu_allocated_gib": info.get("peak_gpu_allocated_gib"),
        "output_bytes": folder_bytes(result),
        "timing": timing,
        "layers": {k: {f: v[f] for f in ("dropped_experts", "best_loss", "search", "n_evaluated")}
                   for k, v in info["layers"].items()},
    })
    phases = [l["phases_s"] for l in layers.values() if "phases_s" in l]
    if phases:
        entry["phases_s_per_layer_mean"] = {k: sum(p[k] for p in phases) / len(phases) for k in phases[0]}
    if not args.keep_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    return entry


def describe(entry: dict) -> str:
    if entry.get("returncode") != 0:
        return f"{entry['load']} {entry['method']} r={entry['r']}: " + (
            entry.get("skipped") or f"FAILED (exit {entry['returncode']}): {entry.get('stderr_tail', '')[-600:]}")
    text = (f"{entry['load']:9s} {entry['method']:19s} r={entry['r']}: {entry['wall_s']:.1f} s wall, "
            f"{entry['seconds_per_layer']:.2f} s/layer, peak RSS {entry['peak_host_rss_gib']:.1f} GiB")
    if entry.get("peak_gpu_allocated_gib") is not None:
        text += f", peak GPU {entry['peak_gpu_allocated_gib']:.1f} GiB"
    if "phases_s_per_layer_mean" in entry:
        text += " | per layer: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["phases_s_per_layer_mean"].items())
    return text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    runs = [parse_run(s) for s in args.runs]
    start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config = model_config(args)
    model_dir = work / "model"
    checkpoint = build_checkpoint(args, config, model_dir)
    print(f"checkpoint {model_dir}: {checkpoint['bytes'] / 2**30:.2f} GiB in {checkpoint['shards']} shards"
          + (" (reused)" if checkpoint["reused"] else f", built in {checkpoint['init_s']:.1f} s + written in "
                                                       f"{checkpoint['save_s']:.1f} s"), flush=True)
    synthetic = work / f"calib_{args.n_blocks}x{args.block_size}_seed{args.seed}.jsonl"  # reused only if the same
    calib = Path(args.calib_path) if args.calib_path else synthetic_calibration(args, model_dir, synthetic)
    report = {"args": vars(args), "config": config.to_dict(), "checkpoint": checkpoint,
              "calibration": {"path": str(calib), "synthetic": args.calib_path is None},
              "environment": {"device": args.device, "torch": torch.__version__,
                              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                              "cpus": os.cpu_count()},
              "runs": []}

    def write():
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")

    write()
    for load, method, r in runs:
        if time.perf_counter() - start > args.time_budget_s:
            entry = {"load": load, "method": method, "r": r, "returncode": None,
                     "skipped": f"not started: {args.time_budget_s:.0f} s time budget spent"}
        else:
            entry = run_main(args, model_dir, calib, load, method, r, work / f"out_{load}_{method}_r{r}")
        report["runs"].append(entry)
        print(describe(entry), flush=True)
        write()
    report["total_s"] = time.perf_counter() - start
    write()
    return 0 if all(e.get("returncode") == 0 for e in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
