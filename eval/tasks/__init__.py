"""The bundled offline lm-eval tasks (the *.yaml files beside this one) and what makes them usable.

The YAMLs are templates: YAML cannot read environment variables, so their `data_files` paths hold
the placeholder `${MOE_EVAL_DATA}`. `write_resolved_tasks` writes copies with the data folder filled
in, which any lm-eval reads with `--include_path`; `python -m eval.tasks --write DIR` does it from the
command line (see __main__.py), and eval/run_lm_eval.py does it into a temporary folder on every run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from cli import UsageError

TASKS_DIR = Path(__file__).resolve().parent
REPO = TASKS_DIR.parent.parent
DATA_ENV = "MOE_EVAL_DATA"
PLACEHOLDER = "${" + DATA_ENV + "}"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "eval"


def local_tasks() -> dict[str, list[str]]:
    """Local task name (the YAML's file name) -> the data files it reads, relative to the data folder."""
    pattern = re.compile(re.escape(PLACEHOLDER) + r"/([^\"']+)")
    return {p.stem: pattern.findall(p.read_text()) for p in sorted(TASKS_DIR.glob("*.yaml"))}


def resolve_data_dir(flag: str | None) -> Path:
    """The data folder: the flag, else $MOE_EVAL_DATA, else ../shared/data/eval if it exists."""
    if flag:
        source, path = "--data_dir", Path(flag).expanduser()
    elif os.environ.get(DATA_ENV):
        source, path = DATA_ENV, Path(os.environ[DATA_ENV]).expanduser()
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
                hint = (f" ({data_dir / 'eval' / name} exists: the data folder is {data_dir / 'eval'})"
                        if (data_dir / "eval" / name).is_file() else "")
                raise UsageError(f"task {task} needs {data_dir / name}, which is missing{hint}: pass --data_dir DIR "
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


def write_resolved_tasks(data_dir: Path, dest: Path, tasks: list[str] | None = None) -> list[Path]:
    """Write the task YAMLs (all, or the named ones) into dest with the data folder filled in for the
    placeholder, plus the helper modules their `!function` tags load from next to them. Returns the YAMLs."""
    value = json.dumps(str(data_dir))[1:-1]  # the placeholder sits in double-quoted YAML strings: JSON's escapes
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sorted(TASKS_DIR.iterdir()):
        if src.suffix == ".yaml" and (tasks is None or src.stem in tasks):
            written.append(dest / src.name)
            written[-1].write_text(src.read_text().replace(PLACEHOLDER, value))
        elif src.suffix == ".py" and not src.name.startswith("__"):  # helpers, not this package's own modules
            shutil.copy(src, dest / src.name)
    return written
