"""Build data/math_pretrain_style.json (the paper's MATH calibration set) from a MATH download.

Each problem file of the MATH train split ({"problem", "solution", ...}) becomes one
document `problem + " " + solution`; documents are shuffled with Python's `random` and
the seed, and written as a JSON array of {"text": ...}, as the original script did.
(The original listed files in the file system's order; we sort them first so that the
output does not depend on the file system.)

    python data/math_calib_construction.py --dataset_path /path/to/MATH_parent --output_path data/
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def build(dataset_path: str, output_path: str = "data", seed: int = 42, split: str = "train") -> Path:
    root = Path(dataset_path)
    split_dir = next((d for d in (root / "MATH" / split, root / split) if d.is_dir()), None)
    if split_dir is None:
        raise FileNotFoundError(f"no MATH {split} split under {root} (looked for MATH/{split}/ and {split}/); "
                                "download MATH from https://github.com/hendrycks/math and pass its folder")
    files = sorted(p for p in split_dir.glob("*/*.json"))
    if not files:
        raise FileNotFoundError(f"{split_dir} holds no <subject>/<n>.json problem files")
    docs = []
    for f in files:
        rec = json.loads(f.read_text(encoding="utf-8"))
        docs.append({"text": rec["problem"] + " " + rec["solution"]})
    random.seed(seed)
    random.shuffle(docs)
    out = Path(output_path) / "math_pretrain_style.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(docs), encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_path", required=True, help="folder holding MATH/train/<subject>/*.json (or train/...)")
    p.add_argument("--output_path", default="data", help="folder to write math_pretrain_style.json into")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed")
    p.add_argument("--split", default="train", help="MATH split to read (the paper uses train)")
    args = p.parse_args(argv)
    try:
        out = build(args.dataset_path, args.output_path, args.seed, args.split)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
