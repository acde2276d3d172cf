"""Evaluate a pruned, skipping or plain checkpoint with lm-evaluation-harness.

    python eval/run_lm_eval.py --model_path CKPT --tasks arc_easy_local,boolq_local --output_path out/

The model is loaded with `model.load_model`, so a checkpoint whose config has `betas` is
evaluated WITH dynamic skipping (the stock `lm_eval` CLI loads it with plain transformers,
which ignores `betas`). Writes <output_path>/results.json (lm-eval's results and config, plus
the skip rates when skipping was on) and <output_path>/results.md (one row per task and
metric, value ± stderr); with --log_samples also samples_<task>.jsonl. See docs/evaluation.md.

Local tasks (eval/tasks/*.yaml) read the benchmark files from a data folder: --data_dir, else
$MOE_EVAL_DATA, else ../shared/data/eval next to the repo. YAML cannot read environment
variables, so the task files hold a placeholder that this script fills in, writing the
resolved copies to a temporary folder that lm-eval indexes as an include path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python eval/run_lm_eval.py`: make `model` importable
    sys.path.insert(0, str(REPO))

from cli import UsageError, check_output_dir, fail  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_ENV = "MOE_EVAL_DATA"
PLACEHOLDER = "${" + DATA_ENV + "}"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "eval"


# ---- local tasks ------------------------------------------------------------------------------
def local_tasks() -> dict[str, list[str]]:
    """Local task name (the YAML's file name) -> the data files it reads, relative to the data folder."""
    pattern = re.compile(re.escape(PLACEHOLDER) + r"/([^\"']+)")
    return {p.stem: pattern.findall(p.read_text()) for p in sorted(TASKS_DIR.glob("*.yaml"))}


def resolve_data_dir(flag: str | None) -> Path:
    """The data folder: --data_dir, else $MOE_EVAL_DATA, else ../shared/data/eval if it exists."""
    if flag:
        source, path = "--data_dir", Path(flag)
    elif os.environ.get(DATA_ENV):
        source, path = DATA_ENV, Path(os.environ[DATA_ENV])
    elif DEFAULT_DATA_DIR.is_dir():
        return DEFAULT_DATA_DIR
    else:
        raise UsageError(f"local tasks need a data folder: pass --data_dir DIR or set {DATA_ENV} "
                         f"(the default {DEFAULT_DATA_DIR} does not exist)")
    if not path.is_dir():
        raise UsageError(f"data folder {path} (from {source}) does not exist: pass --data_dir DIR or set {DATA_ENV}")
    return path.resolve()


def check_data_files(data_dir: Path, tasks: list[str], local: dict[str, list[str]]) -> None:
    for task in tasks:
        for name in local[task]:
            if not (data_dir / name).is_file():
                raise UsageError(f"task {task} needs {data_dir / name}, which is missing: pass --data_dir DIR "
                                 f"or set {DATA_ENV} to the folder that holds {name}")


def check_task_files(folders: list[Path]) -> None:
    """Every task YAML that lm-eval will index parses: lm-eval skips one that does not without a word, and
    would then call its task unknown."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's tags (`!function module.fn`) only need to parse here
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for folder in folders:
        for path in sorted(folder.rglob("*.yaml")):
            try:
                with open(path, encoding="utf-8") as f:
                    yaml.load(f, Loader=Loader)  # noqa: S506 (SafeLoader plus inert tags)
            except yaml.MarkedYAMLError as e:
                mark = e.problem_mark or e.context_mark
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
                raise UsageError(f"task file {path} does not parse ({where}{e.problem or e.context}): "
                                 "fix or remove it") from None
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise UsageError(f"task file {path} does not parse ({e}): fix or remove it") from None


def materialise_local_tasks(data_dir: Path, dest: Path) -> None:
    """Copy eval/tasks into dest with the data folder filled in for the placeholder."""
    # The placeholder sits in double-quoted YAML strings, whose escapes are JSON's.
    value = json.dumps(str(data_dir))[1:-1]
    for src in TASKS_DIR.iterdir():
        if src.suffix == ".yaml":
            (dest / src.name).write_text(src.read_text().replace(PLACEHOLDER, value))
        elif src.suffix == ".py":  # helpers that the YAMLs' `!function` tags load from next to them
            shutil.copy(src, dest / src.name)


def task_manager(tasks: list[str], local_dir: Path | None, include_path: Path | None, local: dict[str, list[str]]):
    """A TaskManager that knows every requested task; UsageError naming the unknown ones otherwise."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in (local_dir, include_path) if p is not None]  # later ones win on a name clash
    if paths:
        # Indexing lm-eval's ~15k stock task YAMLs takes seconds: skip it when every name is a single task
        # of ours or of --include_path (a group or tag may name stock tasks, so those need the full index).
        own = TaskManager(include_path=paths, include_defaults=False)
        if all(t in own.all_subtasks for t in tasks):
            return own
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = "lm-eval's" + (f" nor under {include_path}" if include_path else "")
        raise UsageError(f"unknown task(s) {', '.join(unknown)}: not {where}; local tasks: {', '.join(local)}")
    return manager


# ---- model --------------------------------------------------------------------------------------
def load(args):
    from model import load_model

    try:
        # Checks the path, the config and its betas before any weight is read.
        return load_model(args.model_path, device=args.device, dtype=args.dtype, skipping=not args.no_skipping)
    except OSError as e:  # transformers' "not a valid model identifier", missing weights and the like
        raise UsageError(f"cannot load a model from {args.model_path}: {str(e).strip().splitlines()[0]}") from None
    except ValueError as e:  # no such folder, no config.json, bad betas (BetasError), an unknown dtype
        raise UsageError(str(e)) from None


# ---- evaluation and output ----------------------------------------------------------------------
def evaluate(model, tokenizer, tasks: list[str], manager, args) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    seeds = {} if args.seed is None else dict(random_seed=args.seed, numpy_random_seed=args.seed,
                                              torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                   limit=args.limit, task_manager=manager, log_samples=args.log_samples, **seeds)


def markdown(results: dict) -> str:
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    skipping = results.get("dynamic_skipping")
    if skipping:
        text += (f"\nDynamic skipping on (betas {skipping['betas']}): skip rate {skipping['skip_rate']:.2%} "
                 f"({skipping['skipped']} skipped expert slots over {skipping['tokens']} routed tokens).\n")
    return text


def write_outputs(results: dict, output_path: Path) -> str:
    """results.json, results.md and (--log_samples) samples_<task>.jsonl; returns the table."""
    from lm_eval.utils import handle_non_serializable

    def dumps(obj, **kw) -> str:
        return json.dumps(obj, default=handle_non_serializable, ensure_ascii=False, **kw)

    output_path.mkdir(parents=True, exist_ok=True)
    for task, records in results.pop("samples", {}).items():
        (output_path / f"samples_{task}.jsonl").write_text("".join(dumps(r) + "\n" for r in records))
    (output_path / "results.json").write_text(dumps(results, indent=2) + "\n")
    table = markdown(results)
    (output_path / "results.md").write_text(table)
    return table


def run(args) -> dict:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks is empty")
    check_output_dir(args.output_path, "--output_path")  # before the evaluation, not after it
    include_path = Path(args.include_path) if args.include_path else None
    if include_path is not None and not include_path.is_dir():
        raise UsageError(f"--include_path {include_path} is not a folder")
    check_task_files([TASKS_DIR] + ([include_path] if include_path else []))
    local = local_tasks()
    wanted_local = [t for t in tasks if t in local]
    data_dir = None
    if wanted_local:
        data_dir = resolve_data_dir(args.data_dir)
        check_data_files(data_dir, wanted_local, local)
    if all(t in local for t in tasks):
        # Nothing to download, but `datasets` pings a usage counter online on every load_dataset("json", ...)
        # unless it is in offline mode (which it reads when first imported, below).
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="moe_eval_tasks_") as tmp:
        local_dir = None
        if data_dir is not None:
            local_dir = Path(tmp)
            materialise_local_tasks(data_dir, local_dir)
        manager = task_manager(tasks, local_dir, include_path, local)
        model, tokenizer = load(args)
        results = evaluate(model, tokenizer, tasks, manager, args)

    results["runner_args"] = {**vars(args), "data_dir": str(data_dir) if data_dir else None}
    if model.dynamic_skipping is not None:
        results["dynamic_skipping"] = {"betas": model.config.betas, **model.dynamic_skipping.stats()}
    print(write_outputs(results, Path(args.output_path)))
    return results


# ---- command line -------------------------------------------------------------------------------
def batch_size(value: str) -> int | str:
    if value.startswith("auto"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither an integer nor auto[:N]") from None


def limit(value: str) -> int | float:
    number = float(value)
    return int(number) if number >= 1 else number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    local = ", ".join(local_tasks())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True,
                   help="checkpoint folder (pruned, skipping or plain) or Hugging Face Hub id")
    p.add_argument("--tasks", required=True,
                   help=f"comma-separated lm-eval task, group or tag names; local (offline) tasks: {local}")
    p.add_argument("--output_path", required=True, help="folder for results.json and results.md")
    p.add_argument("--data_dir", default=None,
                   help=f"folder with the local tasks' files (default: ${DATA_ENV}, "
                        "else ../shared/data/eval beside the repo)")
    p.add_argument("--include_path", default=None,
                   help="folder of your own lm-eval task YAMLs (as the lm_eval CLI's flag)")
    p.add_argument("--num_fewshot", type=int, default=None,
                   help="few-shot examples per prompt (default: each task's own, 0 for most, 5 for GSM8K)")
    p.add_argument("--batch_size", type=batch_size, default=1,
                   help="batch size: an integer, or auto[:N] as lm-eval takes it (default 1)")
    p.add_argument("--limit", type=limit, default=None,
                   help="evaluate only the first N documents of each task (a fraction when < 1); for tests")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for python, numpy, torch and the few-shot sampler (default: lm-eval's 0/1234/1234/1234)")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N, cpu, or auto (spread over the GPUs); default: the GPU when there is one")
    p.add_argument("--dtype", default=None,
                   help="bfloat16, float16, float32 or auto; default: the checkpoint's own dtype")
    p.add_argument("--log_samples", action="store_true",
                   help="also write each document's prompt, responses and scores to samples_<task>.jsonl")
    p.add_argument("--no_skipping", action="store_true",
                   help="evaluate a checkpoint that has `betas` without dynamic skipping")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        return fail("run_lm_eval.py", e)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
