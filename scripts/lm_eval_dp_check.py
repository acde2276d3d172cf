"""Data-parallel lm-eval of a skipping checkpoint equals one process: the 2-GPU check (issue 12, section 1).

Here, once (pip and the package index needed): the packages lm-eval needs at run time that the GPU
image lacks, into the ignored folder .carry/lmeval_site (20.4 MiB), and the two tasks' data files
into .carry/eval_data (../shared does not travel; 2.8 MiB):

    python scripts/lm_eval_dp_check.py --prepare

On a machine with 2 GPUs, from the repository root, with .carry/lmeval_site and .carry/eval_data carried along:

    python3 scripts/lm_eval_dp_check.py --out dp_check.json

It puts .carry/lmeval_site on PYTHONPATH, makes the demo model's skipping checkpoint
(`main.py --method dynamic_skipping --calib_set self` on demo/tiny-moe: seconds), and evaluates it
on arc_easy_local and boolq_local (the bundled offline tasks, data from --data_dir) through
eval/run_lm_eval.py (lm-eval's CLI with the model type moe-skip), at batch size 1:

- single:      one process, one GPU;
- dp:          `accelerate launch --multi_gpu --num_processes 2` (data parallel: each process half the documents);
- parallelize: one process, `parallelize=True,device_map=balanced` (the model's layers over both GPUs).

The JSON has each run's accuracies, routed tokens, skipped expert slots and skip rate (per process for dp),
and, against `single`: whether the metrics are equal, the largest difference of any choice's
log-likelihood, and whether the skip counts are equal. Exit code 0 when every run finished and agrees.

What is carried, and why: lm-eval 0.4.13 imports `datasets` (its tasks load data through it, also local
JSON files: no way around it), `pytablewriter` (results table) and, through them, dill, multiprocess,
DataProperty, mbstrdecoder, tabledata, typepy (+ pytz), pathvalidate, tcolorpy, chardet; fsspec is carried
at the version datasets 5.2 pins. Everything else it imports for these tasks (torch, transformers,
accelerate, numpy, pandas, pyarrow, xxhash, huggingface_hub, scikit-learn, sacrebleu, jinja2, pyyaml,
requests, tqdm, ...) is in the GPU image. pyarrow (166 MiB installed) could not be carried within 50 MiB:
the image's own is used (datasets 5.2 asks for pyarrow >= 24; the check prints the version it finds).
lm-eval's ~15,000 stock task files (69 MiB) are left out except the stock counterparts of the bundled
tasks (arc, super_glue, hellaswag, winogrande, gsm8k, openbookqa), so stock task names other than those
are unknown with this carry; the bundled *_local tasks need nothing else.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRY = REPO / ".carry" / "lmeval_site"
DATA_CARRY = REPO / ".carry" / "eval_data"  # ../shared does not travel to the GPU machine: the two files do
DATA_FILES = ("arc_easy_test.jsonl", "boolq_validation.jsonl")  # what TASKS read
SHARED_EVAL = REPO.parent / "shared" / "data" / "eval"
# Exact versions: the ones requirements.txt and this repo's tests use (lm_eval, datasets) and what they resolve to.
PACKAGES = {"lm_eval": "0.4.13", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19",
            "pytablewriter": "1.2.1", "DataProperty": "1.1.1", "mbstrdecoder": "1.1.5", "tabledata": "1.3.5",
            "typepy": "1.3.5", "pytz": "2026.6", "pathvalidate": "3.3.1", "tcolorpy": "0.1.7",
            "chardet": "6.0.0.post1", "fsspec": "2026.9.0"}
KEEP_STOCK_TASKS = ("arc", "super_glue", "hellaswag", "winogrande", "gsm8k", "openbookqa")
GPU_PYTHON = "3.12"  # the GPU image's python3
TASKS = "arc_easy_local,boolq_local"


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20  # stdlib only, as this launcher


def prepare(python_version: str) -> int:
    """pip install --target .carry/lmeval_site --no-deps (wheels for the GPU image's Python), then prune; copy the
    tasks' data files to .carry/eval_data."""
    DATA_CARRY.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        shutil.copy(SHARED_EVAL / name, DATA_CARRY / name)
    print(f"copied {', '.join(DATA_FILES)} to {DATA_CARRY} ({folder_mib(DATA_CARRY):.1f} MiB)")
    if CARRY.exists():
        shutil.rmtree(CARRY)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(CARRY), "--no-deps", "--no-compile",
           "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", *(f"{name}=={v}" for name, v in PACKAGES.items())]
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        return 1
    before = folder_mib(CARRY)
    tasks = CARRY / "lm_eval" / "tasks"
    for entry in tasks.iterdir():
        if entry.is_dir() and entry.name not in KEEP_STOCK_TASKS:
            shutil.rmtree(entry)
    shutil.rmtree(CARRY / "bin", ignore_errors=True)  # console scripts with this machine's interpreter path
    sizes = {p.name: round(folder_mib(p), 2) for p in sorted(CARRY.iterdir()) if p.is_dir()}
    print(json.dumps({"installed_mib": round(before, 1), "carried_mib": round(folder_mib(CARRY), 1),
                      "files": sum(1 for p in CARRY.rglob("*") if p.is_file()), "folders_mib": sizes}, indent=1))
    return 0


# ---- the check ----------------------------------------------------------------------------------------
def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CARRY), str(REPO), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # NVLink multicast stays off on the shared GPU hosts (the launcher's processes inherit these).
    for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):
        env.setdefault(key, value)
    return env


VERSIONS = """
import importlib.metadata as md, json, torch
out = {n: md.version(n) for n in ("torch", "transformers", "accelerate", "lm_eval", "datasets", "pyarrow", "fsspec",
                                  "pandas", "huggingface_hub")}
import lm_eval, datasets, lm_eval.models.huggingface  # the imports the runs need
out["lm_eval_from"] = lm_eval.__file__
out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(json.dumps(out))
"""


def run_logged(cmd: list[str], env: dict, log: Path) -> tuple[int, float]:
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - start


def read_run(out: Path, log: Path) -> dict:
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.loads(Path(results_file).read_text())
    lls = {}  # "task|doc index" -> the choices' log-likelihoods
    for samples in glob.glob(str(out / "*" / "samples_*.jsonl")):
        task = Path(samples).name[len("samples_"):].rsplit("_", 1)[0]  # samples_<task>_<date>.jsonl
        for line in Path(samples).read_text().splitlines():
            record = json.loads(line)
            lls[f"{task}|{record['doc_id']}"] = [float(ll) for ll, _ in record["filtered_resps"]]
    metrics = {task: {k.split(",")[0]: v for k, v in m.items() if k.split(",")[0] in ("acc", "acc_norm")}
               | {"n": results["n-samples"][task]["effective"]} for task, m in results["results"].items()}
    devices = [line.split("model on ")[-1].strip() for line in log.read_text().splitlines() if "model on " in line]
    return {"metrics": metrics, "dynamic_skipping": results["config"].get("dynamic_skipping"),
            "model_devices": devices[:1], "_lls": lls}


def compare(run: dict, ref: dict) -> dict:
    common = sorted(set(run["_lls"]) & set(ref["_lls"]))
    diff = max((abs(a - b) for k in common for a, b in zip(run["_lls"][k], ref["_lls"][k], strict=True)),
               default=None)
    counts = ("tokens", "skipped")
    return {"metrics_equal": run["metrics"] == ref["metrics"],
            "documents_compared": len(common), "documents_missing": len(set(ref["_lls"]) ^ set(run["_lls"])),
            "max_abs_loglikelihood_diff": diff,
            "skip_counts_equal": [run["dynamic_skipping"][k] for k in counts] ==
                                 [ref["dynamic_skipping"][k] for k in counts]}


def check(args) -> int:
    env = environment()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report: dict = {"settings": {"tasks": args.tasks, "limit": args.limit, "batch_size": 1, "dtype": args.dtype,
                                 "carry": str(CARRY)}}

    def finish(ok: bool) -> int:
        report["ok"] = ok
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({k: v for k, v in report.items()}, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return 0 if ok else 1

    probe = subprocess.run([sys.executable, "-c", VERSIONS], env=env, capture_output=True, text=True, cwd=REPO)
    if probe.returncode:
        report["error"] = "lm-eval does not import here (is .carry/lmeval_site carried?): " + probe.stderr[-2000:]
        return finish(False)
    report["versions"] = json.loads(probe.stdout.strip().splitlines()[-1])

    ckpt_root = work / "ckpt"
    rc, wall = run_logged([sys.executable, "main.py", "--method", "dynamic_skipping", "--calib_set", "self",
                           "--model_path", "demo/tiny-moe", "--max_block_size", "256", "--n_blocks_for_stat", "32",
                           "--output_path", str(ckpt_root), "--device", args.device], env, work / "calibrate.log")
    if rc:
        report["error"] = "calibration failed: " + (work / "calibrate.log").read_text()[-2000:]
        return finish(False)
    (ckpt,) = glob.glob(str(ckpt_root / "tiny-moe_dynamic_skipping_*"))
    report["checkpoint"] = {"path": ckpt, "betas": json.loads((Path(ckpt) / "config.json").read_text())["betas"],
                            "calibration_wall_s": round(wall, 1)}

    common = ["--model_path", ckpt, "--data_dir", str(Path(args.data_dir).resolve()), "--tasks", args.tasks,
              "--limit", str(args.limit), "--batch_size", "1", "--log_samples"]
    dtype = ["--model_args", f"dtype={args.dtype}"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    commands = {
        "single": [sys.executable, "-m", "eval.run_lm_eval", *common, *dtype, "--device", args.device],
        "dp": [*launch, "-m", "eval.run_lm_eval", *common, *dtype],
        "parallelize": [sys.executable, "-m", "eval.run_lm_eval", *common, "--model_args",
                        f"dtype={args.dtype},parallelize=True,device_map=balanced"],
    }
    report["runs"] = {}
    ok = True
    for name in args.runs.split(","):
        out, log = work / name, work / f"{name}.log"
        cmd = [*commands[name], "--output_path", str(out)]
        rc, wall = run_logged(cmd, env, log)
        entry = {"command": " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), "rc": rc, "wall_s": round(wall, 1)}
        if rc == 0:
            entry |= read_run(out, log)
        else:
            ok = False
            entry["log_tail"] = log.read_text()[-3000:]
        report["runs"][name] = entry
    single = report["runs"].get("single")
    if single and single["rc"] == 0:
        report["against_single"] = {}
        for name, entry in report["runs"].items():
            if name != "single" and entry["rc"] == 0:
                result = compare(entry, single)
                report["against_single"][name] = result
                ok &= result["metrics_equal"] and result["skip_counts_equal"] and result["documents_missing"] == 0
    for entry in report["runs"].values():
        entry.pop("_lls", None)
    return finish(ok)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="write .carry/lmeval_site here (needs pip and the index)")
    p.add_argument("--python_version", default=GPU_PYTHON, help="--prepare: the GPU image's Python (default 3.12)")
    p.add_argument("--out", default="dp_check.json", help="the comparison JSON")
    p.add_argument("--work", default="/tmp/lm_eval_dp_check", help="checkpoint, run outputs and logs (emptied)")
    p.add_argument("--data_dir", default=str(DATA_CARRY if DATA_CARRY.is_dir() else SHARED_EVAL),
                   help="folder with the tasks' files (default: .carry/eval_data if there, else ../shared/data/eval)")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=200, help="documents per task")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda:0", help="the single run's device, and the calibration's")
    p.add_argument("--runs", default="single,dp,parallelize")
    args = p.parse_args(argv)
    return prepare(args.python_version) if args.prepare else check(args)


if __name__ == "__main__":
    sys.exit(main())
