"""Tile sizes of the fused experts kernels: time one layer's experts per configuration.

Mixtral-8x7B and Qwen3-30B-A3B expert shapes, bf16, random weights, batches 1 and 16, each call
replayed from a CUDA graph (as in decoding), 8 layers' weights cycled so that L2 holds none of
them. Prints ms per layer and the fraction of the bandwidth floor for the weights read.

    python scripts/tune_fused.py --output docs/results/h200/tune_fused.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model import fused_experts as fe  # noqa: E402

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}


def time_layers(weights, x, idx, w, reps: int = 20) -> float:
    def run():
        for gu, d in weights:
            fe.fused_experts_triton(x, idx, w, gu, d)

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / len(weights)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output", default=None)
    args = p.parse_args()
    out = []
    torch.manual_seed(0)
    for name, (h, i, e, k) in SHAPES.items():
        n_layers = 8 if e == 8 else 16
        weights = [(torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02,
                    torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(n_layers)]
        for t in (1, 16):
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            idx = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
            w = torch.rand(t, k, device="cuda").softmax(-1)
            touched = int(torch.unique(idx).numel())
            floor_ms = touched * 3 * h * i * 2 / 4.8e12 * 1e3
            for gu_cfg, d_cfg in itertools.product([(16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4)],
                                                   [(32, 256, 4), (64, 128, 4), (64, 256, 4), (128, 128, 8)]):
                fe.BLOCK.update(gate_up=gu_cfg, down=d_cfg)
                fe.BLOCK_WIDE.update(gate_up=gu_cfg, down=d_cfg)
                try:
                    ms = time_layers(weights, x, idx, w)
                except Exception as exc:  # a tile too large for the shape / registers
                    ms = None
                    print(name, t, gu_cfg, d_cfg, repr(exc)[:100])
                row = {"shape": name, "tokens": t, "gate_up": gu_cfg, "down": d_cfg, "ms_per_layer": ms,
                       "experts_touched": touched, "floor_ms": floor_ms,
                       "fraction_of_floor": floor_ms / ms if ms else None}
                out.append(row)
                print(json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    best = {}
    for r in out:
        key = f"{r['shape']} bs{r['tokens']}"
        if r["ms_per_layer"] and (key not in best or r["ms_per_layer"] < best[key]["ms_per_layer"]):
            best[key] = r
    print(json.dumps(best, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": out, "best": best}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
