"""Time reading decoder layers from a checkpoint: the direct expert read against transformers' loader, side by side.

For each decoder layer of --model_path (a safetensors checkpoint, e.g. the one scripts/bench_streaming.py writes
into output/bench_streaming/model), `LayerStream._load` (the read alone, without `load`'s checks) is timed
--repeats times with `model.streaming.FAST_EXPERT_READ` on and off, alternating (so both see the same page
cache), with the process's minor page faults per load. The layer is freed after each load. Prints a table; --output writes the JSON.

    python scripts/bench_layer_read.py --model_path output/bench_streaming/model --output read.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.streaming as streaming  # noqa: E402
from model.loading import DTYPES  # noqa: E402
from transformers import AutoConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=[k for k in DTYPES if k != "auto"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    config = AutoConfig.from_pretrained(args.model_path)
    dtype = DTYPES[args.dtype]
    runs = {"direct": [], "library": []}
    for _ in range(args.repeats):
        for name, fast in (("direct", True), ("library", False)):
            streaming.FAST_EXPERT_READ = fast
            stream = streaming.LayerStream.plan(args.model_path, config, dtype)
            for idx, layer in enumerate(stream.layers):
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                stream._load(idx)
                seconds = time.perf_counter() - t
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                nbytes = stream.layer_bytes[idx]
                runs[name].append({"layer": idx, "seconds": seconds, "bytes": nbytes, "minor_faults": faults})
                layer.to("meta")  # free it
                streaming._release_freed_memory()
    summary = {name: {"median_s": statistics.median(r["seconds"] for r in rs),
                      "median_gb_s": statistics.median(r["bytes"] / r["seconds"] / 1e9 for r in rs),
                      "median_faults_per_4k": statistics.median(r["minor_faults"] * 4096 / r["bytes"] for r in rs)}
               for name, rs in runs.items()}
    for name, s in summary.items():
        print(f"{name:8s} {s['median_s']:.2f} s per layer, {s['median_gb_s']:.2f} GB/s, "
              f"{s['median_faults_per_4k']:.2f} minor faults per 4 KB")
    print(f"library / direct: {summary['library']['median_s'] / summary['direct']['median_s']:.2f}x")
    if args.output:
        Path(args.output).write_text(json.dumps({"command": " ".join(sys.argv), "model_path": args.model_path,
                                                 "dtype": args.dtype, "summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
