"""lm-evaluation-harness's own command line, with dynamic skipping and the bundled offline tasks.

    python -m eval.run_lm_eval --model_args pretrained=output/<run> --tasks arc_easy_local,boolq_local --output_path out
    accelerate launch --multi_gpu --num_processes 2 -m eval.run_lm_eval --model_args pretrained=output/<run> --tasks ...

Everything is lm-eval's `lm_eval run` (every flag works as there; its outputs are lm-eval's), with:

- the model type `moe-skip` registered (eval/lm_eval_model.py: lm-eval's `hf` plus the checkpoint's
  `betas`, skip rates in the results) and made the default `--model`;
- `--model_path CKPT`, shorthand for `--model_args pretrained=CKPT`;
- the bundled offline tasks (eval/tasks/*.yaml) known by name, reading their files from `--data_dir`
  (else $MOE_EVAL_DATA, else ../shared/data/eval): resolved copies are written to a temporary folder
  that is added to `--include_path`;
- bad input reported in one line (exit code 2) before anything is loaded or written: an unknown task,
  a missing data folder or file, a task YAML that does not parse, a model path that is not a
  checkpoint, bad `betas`, an output path that cannot be written.

See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python eval/run_lm_eval.py`: make `model` importable
    sys.path.insert(0, str(REPO))

from cli import UsageError, check_output_dir, check_output_file, fail  # noqa: E402
from eval.tasks import (DATA_ENV, TASKS_DIR, check_data_files, check_task_files, local_tasks,  # noqa: E402
                        resolve_data_dir, write_resolved_tasks)

PROG = "run_lm_eval.py"
MODEL_NAME = "moe-skip"  # eval.lm_eval_model.MODEL_NAME, without importing lm-eval for --help
SUBCOMMANDS = ("run", "ls", "validate")


def own_parser() -> argparse.ArgumentParser:
    """The flags this script adds to lm-eval's; everything else goes to lm-eval as it is."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)  # no abbreviations: --model is lm-eval's
    p.add_argument("--model_path", default=None, metavar="CKPT",
                   help="checkpoint folder (pruned, skipping or plain) or Hub id: shorthand for "
                        "--model_args pretrained=CKPT")
    p.add_argument("--data_dir", default=None, metavar="DIR",
                   help=f"folder with the local tasks' files (default: ${DATA_ENV}, else ../shared/data/eval "
                        f"beside the repo); local tasks: {', '.join(local_tasks())}")
    return p


def print_help() -> None:
    print(__doc__.split("\n\nSee")[0])
    print("\n" + own_parser().format_help().split("\n", 2)[2].replace("options:", "flags added to lm-eval's:"))
    print(f"`--model` defaults to {MODEL_NAME}; its --model_args are `hf`'s plus skipping=False (evaluate a skipping "
          "checkpoint without skipping).\n\nlm-eval's flags (`lm_eval run --help`):\n")
    sys.stdout.flush()


@contextlib.contextmanager
def argv_as(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


# ---- checks before lm-eval runs ------------------------------------------------------------------
def task_names(args) -> list[str]:
    if not args.tasks:
        raise UsageError("--tasks is required: comma-separated lm-eval task, group or tag names; local tasks: "
                         + ", ".join(local_tasks()))
    tasks = [args.tasks] if isinstance(args.tasks, str) else args.tasks
    return [t.strip() for item in tasks for t in item.split(",") if t.strip()]


def check_tasks_known(tasks: list[str], paths: list[Path], user_include: Path | None) -> None:
    """UsageError naming the requested tasks that neither lm-eval nor the include paths know."""
    from lm_eval.tasks import TaskManager

    names = [t for t in tasks if not t.endswith(".yaml") and not Path(t).is_dir()]  # files and folders: lm-eval's
    # Indexing lm-eval's ~15k stock task YAMLs takes seconds: skip it when every name is a single task of ours or
    # of --include_path (a group or tag may name stock tasks, so those need the full index).
    if paths:
        ours = TaskManager(include_path=[str(p) for p in paths], include_defaults=False).all_subtasks
        if all(t in ours for t in names):
            return
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        where = "lm-eval's" + (f" nor under {user_include}" if user_include else "")
        raise UsageError(f"unknown task(s) {', '.join(unknown)}: not {where}; local tasks: {', '.join(local_tasks())}")


def check_model(args) -> None:
    """A moe-skip checkpoint's path, config and betas, before lm-eval loads anything."""
    from model.loading import check_checkpoint

    model_args = args.model_args or {}
    pretrained = model_args.get("pretrained")
    if pretrained is None:
        raise UsageError(f"--model {MODEL_NAME} needs a checkpoint: --model_path CKPT or --model_args pretrained=CKPT")
    try:
        check_checkpoint(str(pretrained), skipping=model_args.get("skipping", True) is not False,
                         **{k: v for k, v in model_args.items() if k not in ("pretrained", "skipping")})
    except OSError as e:  # transformers' "not a valid model identifier", an unreadable config and the like
        raise UsageError(f"cannot load a model from {pretrained}: {str(e).strip().splitlines()[0]}") from None
    except ValueError as e:  # no such folder, no config.json, bad betas (BetasError), no MoE layer for betas
        raise UsageError(str(e)) from None


def merge_config_file(args) -> None:
    """`--config FILE`: lm-eval takes the values the command line leaves unset from it; so do the checks here."""
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.utils import simple_parse_args_string

    try:
        values = EvaluatorConfig.load_yaml_config(args.config)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"--config {args.config}: {e}") from None
    for key in ("model", "model_args", "tasks", "include_path", "output_path"):
        if not getattr(args, key, None) and values.get(key):
            value = values[key]
            setattr(args, key, simple_parse_args_string(value) if key == "model_args" and isinstance(value, str)
                    else value)


def prepare(args, own, tmp: Path) -> None:
    """Check the run's input and fill in what this script adds (model type, shorthand, local tasks)."""
    if args.config:
        merge_config_file(args)
    if own.model_path is not None:
        if args.model not in (None, MODEL_NAME):
            raise UsageError(f"--model_path is shorthand for --model {MODEL_NAME} --model_args pretrained=CKPT; "
                             f"with --model {args.model} pass pretrained=CKPT in --model_args")
        pretrained = (args.model_args or {}).get("pretrained")
        if pretrained is not None and str(pretrained) != own.model_path:
            raise UsageError(f"--model_path {own.model_path} and --model_args pretrained={pretrained} disagree: "
                             "give one")
        args.model_args = {**(args.model_args or {}), "pretrained": own.model_path}
    if args.model is None:
        args.model = MODEL_NAME
    tasks = task_names(args)
    if args.output_path:
        if Path(args.output_path).suffix == ".json":  # lm-eval writes <name>_<date>.json beside it
            check_output_file(args.output_path, "--output_path")
        else:
            check_output_dir(args.output_path, "--output_path")
    user_include = Path(args.include_path) if args.include_path else None
    if user_include is not None and not user_include.is_dir():
        raise UsageError(f"--include_path {user_include} is not a folder")
    check_task_files([TASKS_DIR] + ([user_include] if user_include else []))
    local = local_tasks()
    wanted_local = [t for t in tasks if t in local]
    paths = [user_include] if user_include else []
    if wanted_local:
        data_dir = resolve_data_dir(own.data_dir)
        check_data_files(data_dir, wanted_local, local)
        write_resolved_tasks(data_dir, tmp)
        paths = [tmp, *paths]  # later paths win a name clash: the user's own tasks
    if all(t in local for t in tasks):
        # Nothing to download, but `datasets` pings a usage counter online on every load_dataset("json", ...)
        # unless it is in offline mode, which it reads when first imported: before check_tasks_known imports
        # lm_eval.tasks (and with it `datasets`).
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    check_tasks_known(tasks, paths, user_include)
    if paths:
        args.include_path = [str(p) for p in paths]  # lm-eval's TaskManager takes a list
    if args.model == MODEL_NAME:
        check_model(args)


# ---- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        argv = ["run", "--help"]
    own, rest = own_parser().parse_known_args(argv)
    if rest and rest[0] not in SUBCOMMANDS:
        rest = ["run", *rest]  # as lm-eval's CLI does: `lm_eval --model ...` means `lm_eval run --model ...`

    from lm_eval._cli import HarnessCLI

    importlib.import_module("eval.lm_eval_model")  # registers the moe-skip model type

    cli = HarnessCLI()
    try:
        with argv_as(["lm-eval", *rest]):
            args = cli.parse_args()
    except SystemExit as e:  # --help, or argparse's own error message
        return e.code if isinstance(e.code, int) else 2
    with tempfile.TemporaryDirectory(prefix="moe_eval_tasks_") as tmp:
        try:
            if args.command == "run":
                prepare(args, own, Path(tmp))
        except UsageError as e:
            return fail(PROG, e)
        from lm_eval.utils import setup_logging

        setup_logging()  # what lm-eval's own entry point (lm_eval.__main__.cli_evaluate) does first
        cli.execute(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
