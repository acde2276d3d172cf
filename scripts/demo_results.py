"""What pruning and skipping cost the demo model: held-out perplexity before and after (CPU, ~15 min).

Runs `main.py` for each configuration below on demo/tiny-moe, scores every result with
eval/perplexity.py on held-out Wikipedia (first 200 articles of wiki_heldout.jsonl.xz) and on
GSM8K test answers, and writes docs/results/demo_tiny_moe.json plus a markdown table.

    python scripts/demo_results.py --shared ../shared/data --out_dir /tmp/demo_runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import main as cli  # noqa: E402
from eval.perplexity import perplexity, token_blocks  # noqa: E402
from data import read_texts  # noqa: E402
from model import load_model  # noqa: E402

DEMO = "demo/tiny-moe"
COMMON = ["--max_block_size", "512", "--n_blocks_for_stat", "128", "--batch_size", "8", "--num_workers", "0",
          "--device", "cpu", "--dtype", "float32"]

# (name, method, r, calib_set, source run or None for the demo model)
RUNS = [
    ("layerwise r=6, C4", "layerwise_pruning", 6, "c4", None),
    ("layerwise r=4, C4", "layerwise_pruning", 4, "c4", None),
    ("layerwise r=6, self", "layerwise_pruning", 6, "self", None),
    ("layerwise r=4, self", "layerwise_pruning", 4, "self", None),
    ("layerwise r=6, MATH", "layerwise_pruning", 6, "math", None),
    ("layerwise r=4, MATH", "layerwise_pruning", 4, "math", None),
    ("progressive r=6, C4", "progressive_pruning", 6, "c4", None),
    ("progressive r=4, C4", "progressive_pruning", 4, "c4", None),
    ("dynamic skipping, C4", "dynamic_skipping", None, "c4", None),
    ("layerwise r=6 + dynamic skipping, C4", "dynamic_skipping", None, "c4", "layerwise r=6, C4"),
]


def calib_path(calib_set: str, shared: Path) -> list[str]:
    files = {"c4": "calib/c4-train.00000-of-01024.first1000.json", "math": "calib/math_pretrain_style.from_MATH_test.json"}
    return ["--calib_path", str(shared / files[calib_set])] if calib_set in files else []


def score(path: str, evals: dict) -> dict:
    model, tokenizer = load_model(path, device="cpu", dtype="float32")
    out = {}
    for name, (texts, block_size) in evals.items():
        if model.dynamic_skipping is not None:
            model.dynamic_skipping.reset_stats()
        res = perplexity(model, token_blocks(texts, tokenizer, block_size))
        if model.dynamic_skipping is not None:
            res["skip_rate"] = model.dynamic_skipping.stats()["skip_rate"]
        out[name] = res
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    p.add_argument("--out_dir", default="/tmp/demo_runs", help="where the pruned checkpoints go")
    p.add_argument("--output", default=str(REPO / "docs" / "results" / "demo_tiny_moe.json"))
    args = p.parse_args(argv)
    shared = Path(args.shared)
    evals = {"wiki": (read_texts(shared / "corpus" / "wiki_heldout.jsonl.xz")[:200], 512),
             "gsm8k": (read_texts(shared / "eval" / "gsm8k_test.jsonl", field="answer"), 512)}
    rows = [{"name": "demo model (unpruned)", "command": None, "path": DEMO, **score(DEMO, evals)}]
    paths = {}
    for name, method, r, calib_set, source in RUNS:
        model_path = paths[source] if source else DEMO
        out = Path(args.out_dir) / name.replace(" ", "_").replace(",", "").replace("=", "").replace("+", "and")
        argv_run = ["--method", method, *(["--r", str(r)] if r else []), "--calib_set", calib_set,
                    *calib_path(calib_set, shared), "--model_path", model_path, "--output_path", str(out), *COMMON]
        start = time.time()
        if cli.main(argv_run) != 0:
            raise SystemExit(f"{name}: main.py failed")
        (result,) = [d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")]
        paths[name] = str(result)
        info = json.loads((result / "pruning_info.json").read_text())
        row = {"name": name, "command": "python main.py " + shlex.join(argv_run).replace(str(shared), "../shared/data"),
               "path": str(result), "prune_seconds": time.time() - start, **score(str(result), evals)}
        if method == "dynamic_skipping":
            row["betas"] = info["layers"]
        else:
            row["dropped"] = {k: v["dropped_experts"] for k, v in info["layers"].items()}
        rows.append(row)
        print(f"{name}: wiki {row['wiki']['perplexity']:.2f}, gsm8k {row['gsm8k']['perplexity']:.2f}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print("| model | wiki ppl | GSM8K-answer ppl | skip rate (wiki) | dropped experts per layer |")
    print("|---|---|---|---|---|")
    for row in rows:
        skip = row["wiki"].get("skip_rate")
        dropped = "; ".join(f"{k}: {v}" for k, v in row.get("dropped", {}).items())
        print(f"| {row['name']} | {row['wiki']['perplexity']:.2f} | {row['gsm8k']['perplexity']:.2f} | "
              f"{'' if skip is None else f'{skip:.3f}'} | {dropped} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
