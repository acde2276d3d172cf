#!/usr/bin/env python
"""The testbeds of issue #10 in few commands: prepare (CPU), train and compare (one GPU), pack.

Two trained MoEs, `testbed-8x` (Mixtral, 8 experts top-2) and `testbed-64x` (Qwen3-MoE, 64 experts
top-8), and their dense twins of the same active size, `dense-8x` and `dense-64x` (scripts/train_moe.py's
presets), then scripts/compare_methods.py on each testbed (r = 6, 4 for 8 experts; 48, 32 for 64; C4, MATH
and self calibration; 5 random seeds; beam widths 1, 4, 16 for 64 experts; skipping curves with the betas
scaled 0.5x..2x on the full model and on top of r = 6 / 48) and the dense twin's perplexity on the same
held-out tokens.

    # CPU, where ../shared/data is: tokenize into .carry/testbeds, copy the evaluation data into .carry/data
    python scripts/testbeds.py prepare
    # GPU (carry .carry/testbeds and .carry/data), one call per testbed: train it and its dense twin
    # at once, compare, pack everything but the weights into $OUT/<testbed>.tar.gz
    python scripts/testbeds.py run --testbed testbed-8x --out $OUT
    python scripts/testbeds.py run --testbed testbed-64x --out $OUT

The steps one by one: `train` (the four trainings at once, or `--only` some), `compare --testbed X`
(its parts as concurrent processes on one device, merged into one JSON, table and figures), `pack`.
Every step is seeded; `--tiny` runs the whole pipeline at toy size on a CPU (a smoke test):

    python scripts/testbeds.py prepare --tiny            # into .carry-tiny/
    python scripts/testbeds.py run --tiny --testbed testbed-64x --device cpu --out /tmp/tb   # testbeds-tiny/

Bad flags or missing inputs: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(REPO))

from cli import UsageError, available_cpus, fail, folder_bytes, sha256_file  # noqa: E402

TRAININGS = ("testbed-8x", "testbed-64x", "dense-8x", "dense-64x")  # scripts/train_moe.py presets
TESTBEDS = {
    "testbed-8x": {"dense": "dense-8x", "r": [6, 4], "skip_on_r": 6, "beam_widths": []},
    "testbed-64x": {"dense": "dense-64x", "r": [48, 32], "skip_on_r": 48, "beam_widths": [1, 4, 16]},
}
# ../shared/data files the comparison reads, copied into <carry>/data for the GPU machine (which cannot see them).
DATA_FILES = {"c4": "calib/c4-train.00000-of-01024.first1000.json",
              "math": "calib/math_pretrain_style.from_MATH_test.json",
              "wiki": "corpus/wiki_heldout.jsonl.xz",
              "gsm8k": "eval/gsm8k_test.jsonl"}
PRUNING_METHODS = ("layerwise", "progressive", "frequency", "reap")  # random: once, in the first part
# The comparison's settings: calibration as main.py (the paper's 128 blocks, at the testbeds' 512-token
# context), evaluation as the training script's (the first 200 held-out articles and every GSM8K test
# answer, 512-token blocks).
COMPARE = {"n_blocks_for_stat": 128, "max_block_size": 512, "batch_size": 8, "random_seeds": 5, "dtype": "bfloat16",
           "wiki_docs": 200, "gsm8k_docs": 0, "eval_block_size": 512, "eval_batch_size": 8,
           "skip_scales": [0.5, 0.75, 1, 1.25, 1.5, 2]}
COMPARE_TINY = {**COMPARE, "n_blocks_for_stat": 4, "max_block_size": 64, "batch_size": 2, "random_seeds": 2,
                "dtype": "float32", "wiki_docs": 5, "gsm8k_docs": 20, "eval_block_size": 64, "eval_batch_size": 4,
                "skip_scales": [0.5, 1, 2]}
PREPARE_TINY = ["--max_docs", "300", "--heldout_docs", "20"]
TRAIN_TINY = ["--tiny", "--max_steps", "3", "--batch_size", "2", "--seq_len", "128", "--max_eval_blocks", "4",
              "--sample_tokens", "8", "--eval_every", "0", "--log_every", "1"]
MAX_PACK_BYTES = 16 * 2 ** 20  # what one file back from the device machine may weigh


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def command_line() -> str:
    return "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def rel(path: Path) -> str:
    """`path` as the subprocesses (run from the repo root) and the records should name it: relative to the repo
    root when inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------- prepare
def prepare(args) -> int:
    """Tokenize Wikipedia + GSM8K train into <carry>/testbeds (train_moe.py's prepare step, with the demo's
    tokenizer), copy the comparison's data files into <carry>/data, and check the size of both."""
    import train_moe

    data = Path(args.data)
    missing = [str(data / f) for f in [*DATA_FILES.values(), "corpus/wiki_train.jsonl.xz", "eval/gsm8k_train.jsonl"]
               if not (data / f).is_file()]
    if missing:
        raise UsageError(f"--data {data}: missing {', '.join(missing)} (see ../shared/data/README.md)")
    carry = Path(args.carry)
    tok_dir, data_dir = carry / "testbeds", carry / "data"
    flags = ["--prepare_only", "--tokenized_dir", rel(tok_dir), "--tokenizer", args.tokenizer,
             "--wiki_train", rel(data / "corpus/wiki_train.jsonl.xz"), "--wiki_heldout", rel(data / DATA_FILES["wiki"]),
             "--gsm8k_train", rel(data / "eval/gsm8k_train.jsonl"), "--gsm8k_test", rel(data / DATA_FILES["gsm8k"]),
             *(PREPARE_TINY if args.tiny else [])]
    meta_file = tok_dir / "meta.json"
    settings = {"flags": flags, "tiny": args.tiny}
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("testbeds_prepare") == settings and not args.force:
        log(f"{tok_dir} holds this preparation already (meta.json): reused; --force redoes it")
    else:
        train_moe.main(flags)
        meta = json.loads(meta_file.read_text())
        meta["testbeds_prepare"] = settings
        meta_file.write_text(json.dumps(meta, indent=2))
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"prepare_command": command_line(), "files": {}}
    for key, name in DATA_FILES.items():
        src, dst = data / name, data_dir / Path(name).name
        shutil.copyfile(src, dst)
        manifest["files"][key] = {"file": dst.name, "source": name, "bytes": dst.stat().st_size,
                                  "sha256": sha256_file(dst)}
    (data_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    sizes = {p: folder_bytes(p) for p in (tok_dir, data_dir)}
    total = sum(sizes.values())
    log("carry: " + ", ".join(f"{p} {b / 2 ** 20:.1f} MiB" for p, b in sizes.items())
        + f"; {total / 2 ** 20:.1f} MiB in all (limit --max_mib {args.max_mib:g})")
    if total > args.max_mib * 2 ** 20:
        raise UsageError(f"{carry}: {total / 2 ** 20:.1f} MiB is over --max_mib {args.max_mib:g}")
    return 0


def check_carry(args) -> tuple[Path, Path]:
    tok_dir, data_dir = Path(args.carry) / "testbeds", Path(args.carry) / "data"
    meta = tok_dir / "meta.json"
    if not meta.is_file() or not (data_dir / "MANIFEST.json").is_file():
        raise UsageError(f"{args.carry}: no prepared data ({meta}, {data_dir / 'MANIFEST.json'}); run "
                         f"'python scripts/testbeds.py prepare{' --tiny' if args.tiny else ''}' where ../shared/data "
                         f"is and carry {tok_dir} and {data_dir}")
    tiny = json.loads(meta.read_text()).get("testbeds_prepare", {}).get("tiny")
    if bool(tiny) != bool(args.tiny):
        raise UsageError(f"{tok_dir} was prepared {'with' if tiny else 'without'} --tiny; run this step "
                         f"{'with' if tiny else 'without'} --tiny too, or prepare again")
    return tok_dir, data_dir


# --------------------------------------------------------------------------------------------- processes
def launch(jobs: dict[str, list[str]], logs: Path, threads: int, prefix: str = "") -> dict[str, tuple]:
    """Start every job (argv lists, run from the repo root) with its output in logs/<prefix><name>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    procs = {}
    for name, argv in jobs.items():
        with open(logs / f"{prefix}{name}.log", "w") as out:
            out.write("$ " + shlex.join(argv) + "\n")
            out.flush()
            procs[name] = (subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env), time.time())
        log(f"started {name} (pid {procs[name][0].pid}): {shlex.join(argv[1:])}")
    return procs


def wait(procs: dict[str, tuple[subprocess.Popen, float]], deadline: float | None) -> dict[str, dict]:
    """Wait for every process; those still running at `deadline` (time.time()) are killed."""
    status = {}
    while len(status) < len(procs):
        for name, (proc, started) in procs.items():
            if name in status:
                continue
            rc = proc.poll()
            if rc is None and deadline is not None and time.time() > deadline:
                proc.kill()
                rc = proc.wait()
                status[name] = {"rc": rc, "killed_at_deadline": True, "seconds": round(time.time() - started, 1)}
                log(f"{name}: killed at the deadline after {status[name]['seconds']:.0f} s")
            elif rc is not None:
                status[name] = {"rc": rc, "seconds": round(time.time() - started, 1)}
                log(f"{name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} after {status[name]['seconds']:.0f} s")
        time.sleep(0.5)
    return status


def log_tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in lines[-n:])


# ----------------------------------------------------------------------------------------------- train
def train_jobs(args, names: list[str], tok_dir: Path) -> dict[str, list[str]]:
    jobs = {}
    for name in names:
        argv = [args.python, "scripts/train_moe.py", "--preset", name, "--tokenized_dir", rel(tok_dir),
                "--device", args.device, "--out", rel(Path(args.root) / name)]
        if args.max_steps:
            argv += ["--max_steps", str(args.max_steps)]
        if args.time_limit_s:
            argv += ["--time_limit_s", f"{args.time_limit_s:g}"]
        jobs[name] = argv + (TRAIN_TINY if args.tiny else [])
    return jobs


def train(args, names: list[str] | None = None, deadline: float | None = None) -> dict:
    """The trainings `names` (default --only, else all four) at once on --device; a report per run."""
    tok_dir, _ = check_carry(args)
    names = names or args.only or list(TRAININGS)
    root = Path(args.root)
    threads = max(1, available_cpus() // len(names))
    log(f"training {', '.join(names)} at once on {args.device} ({threads} CPU threads each)")
    status = wait(launch(train_jobs(args, names, tok_dir), root / "logs", threads, prefix="train_"), deadline)
    report = {}
    for name in names:
        summary_file = root / name / "train_summary.json"
        entry = {"train_log": f"logs/train_{name}.log", **status[name]}
        if status[name]["rc"] == 0 and summary_file.is_file():
            s = json.loads(summary_file.read_text())
            last = s["history"][-1]
            entry.update(params=s["params"], steps=s["steps"], planned_steps=s["planned_steps"],
                         ms_per_step_last=last["ms_per_step"], train_seconds=s["train_seconds"],
                         heldout_wiki_ppl=s["heldout_wiki"]["ppl"], gsm8k_ppl=s["gsm8k_test_answers"]["ppl"],
                         sha256=s["safetensors_sha256"], command=s["command"])
            log(f"{name}: {s['params']['total'] / 1e6:.1f}M params ({s['params']['active_per_token'] / 1e6:.1f}M "
                f"active), {s['steps']}/{s['planned_steps']} steps, last {last['ms_per_step']:.0f} ms/step, "
                f"training {s['train_seconds']:.0f} s; held-out wiki ppl {entry['heldout_wiki_ppl']:.2f}, "
                f"GSM8K answers {entry['gsm8k_ppl']:.2f}")
        else:
            log(f"{name} failed; the end of its log:\n{log_tail(root / 'logs' / f'train_{name}.log')}")
        report[name] = entry
    (root / "train_report.json").write_text(json.dumps({"command": command_line(), "runs": report}, indent=2))
    return report


# --------------------------------------------------------------------------------------------- compare
def compare_parts(args, testbed: str, data_dir: Path, out: Path) -> dict[str, list[str]]:
    """compare_methods.py invocations whose results together are the testbed's whole comparison; each is a
    share of the work that runs on its own (concurrently on one device)."""
    cfg, s = TESTBEDS[testbed], (COMPARE_TINY if args.tiny else COMPARE)
    manifest = json.loads((data_dir / "MANIFEST.json").read_text())["files"]
    path = {k: rel(data_dir / v["file"]) for k, v in manifest.items()}
    n_blocks = args.n_blocks_for_stat or s["n_blocks_for_stat"]
    common = ["--model_path", rel(Path(args.root) / testbed), "--random_seeds", str(s["random_seeds"]),
              "--max_block_size", str(s["max_block_size"]), "--n_blocks_for_stat", str(n_blocks),
              "--batch_size", str(s["batch_size"]), "--dtype", s["dtype"], "--device", args.device,
              "--calib_file", f"c4={path['c4']}", "--calib_file", f"math={path['math']}",
              "--wiki", path["wiki"], "--wiki_docs", str(s["wiki_docs"]), "--gsm8k", path["gsm8k"],
              "--gsm8k_docs", str(s["gsm8k_docs"]), "--eval_block_size", str(s["eval_block_size"]),
              "--eval_batch_size", str(s["eval_batch_size"])]
    r = [str(x) for x in cfg["r"]]
    parts = {"prune-c4": ["--r", *r, "--calib_sets", "c4"],  # every method, random (seeded) included
             "prune-math": ["--r", *r, "--calib_sets", "math", "--methods", *PRUNING_METHODS],
             "prune-self": ["--r", *r, "--calib_sets", "self", "--methods", *PRUNING_METHODS]}
    # compare_methods.py runs at least one method: the beam and skipping parts run the cheapest, random_pruning
    # with its first seed, whose row repeats prune-c4's (merge_parts checks that it kept the same experts).
    cheapest = ["--methods", "random", "--random_seeds", "1"]
    if cfg["beam_widths"]:
        for rr in r:
            parts[f"beam-r{rr}"] = ["--r", rr, "--calib_sets", "c4", *cheapest,
                                    "--beam_widths", *map(str, cfg["beam_widths"])]
    parts["skip"] = ["--r", str(cfg["skip_on_r"]), "--calib_sets", "c4", *cheapest,
                     "--skip_scales", *map(str, s["skip_scales"]), "--skip_on_r", str(cfg["skip_on_r"])]
    return {name: [args.python, "scripts/compare_methods.py", *common, *extra,
                   "--output", rel(out / f"{name}.json"), "--markdown", rel(out / f"{name}.md"),
                   "--fig_dir", rel(out / "figures"), "--fig_prefix", f"{name}_"]
            for name, extra in parts.items()}


def merge_parts(parts: dict[str, dict], status: dict[str, dict]) -> dict:
    """One compare_methods result from its parts: the pruning rows of the prune-* parts (a row that another part
    repeats must have kept the same experts, and is kept once), random's summary over the merged rows (as
    compare_methods.py computes it), the beam rows, the skipping curves."""
    import compare_methods as cm

    if not parts:
        raise ValueError("no part of the comparison finished")
    first = parts.get("prune-c4") or next(iter(parts.values()))
    merged = {k: first[k] for k in ("model_path", "checkpoint_sha256", "n_experts", "top_k", "n_moe_layers",
                                    "eval_data", "platform", "settings")}
    merged.update(full=first["full"], pruning=[], random_summary=[], beam=[], skipping=[], repeated_rows_agree=True)
    # The same checkpoint and tokens in every part: their full-model perplexities differ by the device's
    # nondeterminism at most.
    merged["full_model_max_rel_diff"] = max(abs(res["full"][k]["perplexity"] / first["full"][k]["perplexity"] - 1)
                                            for res in parts.values() for k in cm.EVALS)
    seen = {}
    for name in sorted(parts, key=lambda n: (not n.startswith("prune"), n)):  # prune-* parts' rows first
        res = parts[name]
        for row in res["pruning"]:
            key = (row["method"], row["r"], row["calib_set"], row.get("seed"))
            if key in seen:
                merged["repeated_rows_agree"] &= seen[key]["kept_experts"] == row["kept_experts"]
                continue
            seen[key] = row
            merged["pruning"].append(row)
        merged["beam"] += res["beam"]
        merged["skipping"] += res["skipping"]
    merged["random_summary"] += cm.random_summary(merged["pruning"], sorted({x["r"] for x in merged["pruning"]},
                                                                           reverse=True))
    merged["parts"] = {name: {"command": parts[name]["command"] if name in parts else None,
                              "wall_time_s": parts[name]["wall_time_s"] if name in parts else None, **status.get(name, {})}
                       for name in sorted(set(parts) | set(status))}
    merged["missing_parts"] = sorted(set(status) - set(parts))
    merged["wall_time_s"] = max(p["wall_time_s"] for p in parts.values())
    return merged


def dense_perplexity(args, testbed: str, data_dir: Path) -> dict:
    """The dense twin's perplexities on the comparison's held-out tokens (its tokenizer is the testbed's: checked
    token for token), with eval/perplexity.py's evaluator, in the comparison's dtype."""
    import torch
    from data import read_texts
    from eval.perplexity import perplexity, token_blocks
    from model import load_model
    from transformers import AutoTokenizer

    s = COMPARE_TINY if args.tiny else COMPARE
    manifest = json.loads((data_dir / "MANIFEST.json").read_text())["files"]
    path = Path(args.root) / TESTBEDS[testbed]["dense"]
    texts = {"wiki": read_texts(data_dir / manifest["wiki"]["file"], "text"),
             "gsm8k": read_texts(data_dir / manifest["gsm8k"]["file"], "answer")}
    texts = {"wiki": texts["wiki"][: s["wiki_docs"]] if s["wiki_docs"] else texts["wiki"],
             "gsm8k": texts["gsm8k"][: s["gsm8k_docs"]] if s["gsm8k_docs"] else texts["gsm8k"]}
    model, tokenizer = load_model(str(path), device=args.device, dtype=s["dtype"], skipping=False)
    moe_tokenizer = AutoTokenizer.from_pretrained(Path(args.root) / testbed)
    out = {"model_path": rel(path), "model_class": type(model).__name__,
           "checkpoint_sha256": {"model.safetensors": sha256_file(path / "model.safetensors")},
           "params": sum(p.numel() for p in model.parameters()), "dtype": s["dtype"]}
    for name, folder in (("moe", Path(args.root) / testbed), ("dense", path)):  # how each was trained
        summary = folder / "train_summary.json"
        if summary.is_file():
            t = json.loads(summary.read_text())
            out.setdefault("training", {})[name] = {"steps": t["steps"], "planned_steps": t["planned_steps"],
                                                    "tokens_seen": t["tokens_seen"], "command": t["command"]}
    for k, t in texts.items():
        blocks = token_blocks(t, tokenizer, s["eval_block_size"])
        if not torch.equal(blocks, token_blocks(t, moe_tokenizer, s["eval_block_size"])):  # shapes too
            raise ValueError(f"{path} and {testbed} tokenize the {k} texts differently")
        out[k] = perplexity(model, blocks, s["eval_batch_size"])
    return out


def dense_markdown(merged: dict) -> str:
    d = merged.get("dense_baseline")
    if not d:
        return "Dense twin: not scored (no checkpoint, or it failed).\n"
    full = merged["full"]
    runs = d.get("training", {})
    unequal = ""
    if len(runs) == 2 and runs["moe"]["tokens_seen"] != runs["dense"]["tokens_seen"]:
        unequal = (f" **Not trained the same way**: the MoE saw {runs['moe']['tokens_seen']:,} tokens "
                   f"({runs['moe']['steps']} steps), the dense twin {runs['dense']['tokens_seen']:,} "
                   f"({runs['dense']['steps']} steps); see the training logs.")
    return (f"Dense twin of the same active size (`{Path(d['model_path']).name}`, {d['model_class']}, "
            f"{d['params']:,} parameters), same held-out tokens: Wikipedia perplexity {d['wiki']['perplexity']:.2f} "
            f"(MoE {full['wiki']['perplexity']:.2f}), GSM8K-answer perplexity {d['gsm8k']['perplexity']:.2f} "
            f"(MoE {full['gsm8k']['perplexity']:.2f}).{unequal}\n")


def compare(args, deadline: float | None = None) -> int:
    """Every part of --testbed's comparison at once on --device, then one merged JSON, table and figures."""
    import compare_methods as cm

    _, data_dir = check_carry(args)
    testbed, root = args.testbed, Path(args.root)
    if not (root / testbed / "model.safetensors").is_file():
        raise UsageError(f"{root / testbed} has no model.safetensors: train it first ('train --only {testbed}')")
    out = root / "results" / testbed
    out.mkdir(parents=True, exist_ok=True)
    jobs = compare_parts(args, testbed, data_dir, out)
    if args.parts:
        unknown = sorted(set(args.parts) - set(jobs))
        if unknown:
            raise UsageError(f"--parts {' '.join(unknown)}: the parts of {testbed} are {', '.join(jobs)}")
        jobs = {k: v for k, v in jobs.items() if k in args.parts}
    if deadline is None and args.deadline_s:
        deadline = time.time() + args.deadline_s
    threads = max(1, available_cpus() // len(jobs))
    log(f"comparing {testbed}: {len(jobs)} parts at once on {args.device} ({threads} CPU threads each)"
        + (f", deadline in {deadline - time.time():.0f} s" if deadline else ""))
    procs = launch(jobs, out / "logs", threads)
    dense = None
    dense_dir = root / TESTBEDS[testbed]["dense"]
    if (dense_dir / "model.safetensors").is_file():  # while the parts run
        t0 = time.time()
        dense = dense_perplexity(args, testbed, data_dir)
        log(f"{dense_dir.name}: wiki ppl {dense['wiki']['perplexity']:.3f}, gsm8k {dense['gsm8k']['perplexity']:.3f} "
            f"({time.time() - t0:.0f} s)")
    else:
        log(f"{dense_dir} has no checkpoint: the comparison goes without its dense twin")
    status = wait(procs, deadline)
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in jobs
               if status[name]["rc"] == 0 and (out / f"{name}.json").is_file()}
    for name in jobs:
        if name not in results:
            log(f"part {name} gave no result; the end of its log:\n{log_tail(out / 'logs' / f'{name}.log')}")
    if not results:
        return 1
    merged = merge_parts(results, status)
    merged["command"] = command_line()
    merged["dense_baseline"] = dense
    final = root / "results" / f"{testbed}_compare.json"
    ns = argparse.Namespace(output=str(final), markdown=str(final.with_suffix(".md")),
                            fig_dir=str(root / "results" / "figures"), fig_prefix=f"{testbed}_")
    for path in cm.write_outputs(merged, ns):
        log(f"wrote {path}")
    md = final.with_suffix(".md")
    note = ""
    if merged["skipping"] and merged["top_k"] > 2:
        note += (f"\nSkip rate, top-{merged['top_k']}: skipped expert slots per token, from 0 (none of experts "
                 f"2..{merged['top_k']} skipped) to {merged['top_k'] - 1} (all of them); for top-2 it is the "
                 f"fraction of tokens that skip their 2nd expert.\n")
    if merged["full_model_max_rel_diff"] > 1e-4:
        note += (f"\nWarning: the parts' full-model perplexities differ by up to "
                 f"{merged['full_model_max_rel_diff']:.2g} (relative); the table shows prune-c4's.\n")
    if not merged["repeated_rows_agree"]:
        note += "\nWarning: a row computed by two parts kept different experts in each (see the JSON's parts).\n"
    if merged["missing_parts"]:
        note += (f"\nMissing parts (killed at the deadline or failed): {', '.join(merged['missing_parts'])}; "
                 f"their logs are in results/{testbed}/logs.\n")
    md.write_text(dense_markdown(merged) + "\n" + md.read_text() + note)
    print(md.read_text())
    return 0 if not merged["missing_parts"] else 1


# ------------------------------------------------------------------------------------------------ pack
def pack(args, name: str | None = None) -> Path:
    """<out>/<name>.tar.gz: everything under --root but the weights (JSON, markdown, figures, model cards, logs,
    configs, tokenizers), the prepared data's meta.json and MANIFEST.json, and MANIFEST.json of every file under
    --root with its size and sha256 (the weights included)."""
    root, out = Path(args.root), Path(args.out)
    name = name or args.name
    if not root.is_dir():
        raise UsageError(f"--root {root}: no such folder")
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".partial" not in p.name)
    manifest = {"command": command_line(), "files": {str(p.relative_to(root)): {"bytes": p.stat().st_size,
                                                                                "sha256": sha256_file(p)} for p in files}}
    target = out / f"{name}.tar.gz"
    tmp = target.with_name(f".{target.name}.partial")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in files:
            if p.suffix not in (".safetensors", ".bin", ".pt"):
                tar.add(p, arcname=f"{root.name}/{p.relative_to(root)}")
        for p in (Path(args.carry) / "testbeds" / "meta.json", Path(args.carry) / "data" / "MANIFEST.json"):
            if p.is_file():
                tar.add(p, arcname=f"{root.name}/prepared/{p.parent.name}_{p.name}")
        blob = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(f"{root.name}/MANIFEST.json")
        info.size, info.mtime = len(blob), int(time.time())
        import io

        tar.addfile(info, io.BytesIO(blob))
    tmp.rename(target)
    size = target.stat().st_size
    log(f"packed {len(files)} files' manifest, all but the weights, into {target} ({size / 2 ** 20:.2f} MiB)")
    if size > MAX_PACK_BYTES:
        log(f"warning: {target} is over {MAX_PACK_BYTES / 2 ** 20:.0f} MiB, more than one file back from the device "
            f"machine may weigh")
    return target


# ------------------------------------------------------------------------------------------------- run
def run(args) -> int:
    """One testbed in one call: train it and its dense twin at once, compare, pack; within --budget_s."""
    start = time.time()
    deadline = start + args.budget_s - args.pack_margin_s
    check_carry(args)
    testbed = args.testbed
    if args.time_limit_s is None:  # the trainings' share of the budget (a guard: the presets should end sooner)
        args.time_limit_s = args.train_share * args.budget_s
    rc = 0
    report = train(args, [testbed, TESTBEDS[testbed]["dense"]], deadline=deadline)
    if report[testbed]["rc"] != 0:
        log(f"{testbed} did not train: no comparison")
        rc = 1
    else:
        try:
            rc = compare(args, deadline=deadline)
        except (UsageError, ValueError) as e:
            log(f"comparison failed: {e}")
            rc = 1
    pack(args, name=testbed)
    log(f"run {testbed}: {time.time() - start:.0f} s in all")
    return rc


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)

    def common(q, device=True):
        q.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU smoke test of the pipeline")
        q.add_argument("--carry", default=None, help="where prepare writes (and the GPU reads) testbeds/ and data/ "
                       "(default .carry; with --tiny .carry-tiny)")
        q.add_argument("--root", default=None, help="checkpoints, logs and results (default testbeds; with --tiny "
                       "testbeds-tiny; both git-ignored)")
        if device:
            q.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
            q.add_argument("--python", default=sys.executable, help="the Python that runs the subprocesses")

    q = sub.add_parser("prepare", help="CPU: tokenize into <carry>/testbeds, copy the evaluation data to <carry>/data")
    common(q, device=False)
    q.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    q.add_argument("--tokenizer", default="demo/tiny-moe",
                   help="tokenizer to reuse (default: the demo model's, trained on the same Wikipedia + GSM8K text)")
    q.add_argument("--max_mib", type=float, default=60, help="refuse a carry larger than this (MiB)")
    q.add_argument("--force", action="store_true", help="tokenize again even if <carry>/testbeds is up to date")

    def training(q):
        q.add_argument("--max_steps", type=int, default=None, help="override the presets' step counts")
        q.add_argument("--time_limit_s", type=float, default=None, help="stop each training loop after this many s")

    q = sub.add_parser("train", help="GPU: the four trainings (or --only some) at once on one device")
    common(q)
    training(q)
    q.add_argument("--only", nargs="+", choices=TRAININGS, default=None, help="train only these")

    def comparing(q):
        q.add_argument("--testbed", required=True, choices=list(TESTBEDS))
        q.add_argument("--parts", nargs="+", default=None, help="run only these parts (default: all)")
        q.add_argument("--n_blocks_for_stat", type=int, default=None,
                       help=f"calibration blocks (default {COMPARE['n_blocks_for_stat']}, the paper's count)")

    q = sub.add_parser("compare", help="GPU: compare the methods on one testbed (its parts at once), + its dense twin")
    common(q)
    comparing(q)
    q.add_argument("--deadline_s", type=float, default=None, help="kill parts still running after this many s")

    q = sub.add_parser("pack", help="tar.gz of everything under --root but the weights, into --out")
    common(q, device=False)
    q.add_argument("--out", required=True, help="folder of the archive (e.g. $OUT)")
    q.add_argument("--name", default="testbeds", help="archive name, without .tar.gz")

    q = sub.add_parser("run", help="GPU, one call per testbed: train it and its dense twin, compare, pack")
    common(q)
    training(q)
    comparing(q)
    q.add_argument("--out", required=True, help="folder of the archive (e.g. $OUT)")
    q.add_argument("--budget_s", type=float, default=570, help="the call's time: parts still running at "
                   "budget_s - pack_margin_s are killed (default 570, for a 600 s limit)")
    q.add_argument("--pack_margin_s", type=float, default=25)
    q.add_argument("--train_share", type=float, default=0.4,
                   help="without --time_limit_s, the training loops stop after this share of --budget_s")
    args = p.parse_args(argv)
    args.carry = args.carry or (".carry-tiny" if args.tiny else ".carry")
    args.root = args.root or ("testbeds-tiny" if args.tiny else "testbeds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(SCRIPTS))
    try:
        if args.step == "prepare":
            return prepare(args)
        if args.step == "train":
            report = train(args)
            return 0 if all(r["rc"] == 0 for r in report.values()) else 1
        if args.step == "compare":
            return compare(args)
        if args.step == "pack":
            pack(args)
            return 0
        return run(args)
    except UsageError as e:
        return fail("testbeds.py", e)


if __name__ == "__main__":
    sys.exit(main())
