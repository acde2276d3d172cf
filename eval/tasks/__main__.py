"""Write the bundled tasks with their data folder filled in, for the stock lm-eval CLI.

    python -m eval.tasks --data_dir ../shared/data/eval --write /tmp/moe_tasks
    lm_eval --model hf --model_args pretrained=output/<run> --include_path /tmp/moe_tasks --tasks arc_easy_local

The written YAMLs hold the data folder's absolute path, so they work from any directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import UsageError, check_output_dir, fail
from eval.tasks import DATA_ENV, check_data_files, local_tasks, resolve_data_dir, write_resolved_tasks

PROG = "python -m eval.tasks"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=f"local tasks: {', '.join(local_tasks())}")
    p.add_argument("--write", required=True, metavar="DIR", help="folder to write the task files into (created)")
    p.add_argument("--data_dir", default=None, metavar="DIR",
                   help=f"folder with the benchmark files (default: ${DATA_ENV}, else ../shared/data/eval "
                        "beside the repo)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated local task names to write (default: all; each needs only its own files)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[Path]:
    local = local_tasks()
    tasks = list(local) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in local]
    if unknown or not tasks:
        raise UsageError(f"--tasks {args.tasks!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                         f"local tasks: {', '.join(local)}")
    check_output_dir(args.write, "--write")
    data_dir = resolve_data_dir(args.data_dir)
    check_data_files(data_dir, tasks, local)
    return write_resolved_tasks(data_dir, Path(args.write).expanduser(), tasks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = run(args)
    except UsageError as e:
        return fail(PROG, e)
    folder = Path(args.write).expanduser().resolve()
    print(f"wrote {len(written)} task files to {folder}: {', '.join(p.stem for p in written)}")
    print(f"use them with: lm_eval --include_path {folder} --tasks {written[0].stem} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
