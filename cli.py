"""What the command-line scripts share: one-line errors, the --device flag, peak-memory figures.

Bad input: one line on stderr, exit code 2, nothing written. Each script raises `UsageError`
(or one of the library's own input errors: DataFileError, BetasError, ...) as soon as it finds
a bad flag, path or file; its main() catches them and returns `fail(prog, error)`, which prints
that one line and gives exit code 2. Paths the run will write are checked with
`check_output_file` / `check_output_dir` before anything is loaded, so a bad one fails at once
instead of after the compute.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
from pathlib import Path

import torch

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad flags, paths or files: reported as one line on stderr, exit code 2, nothing written."""


def one_line(message: object, limit: int | None = None) -> str:
    """Library messages (YAML, JSON, transformers) can span lines: join them so that stderr gets one line,
    cut to `limit` characters when given."""
    text = " ".join(part.strip() for part in str(message).strip().splitlines() if part.strip())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def fail(prog: str, message: object) -> int:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` is a folder we may write into (catches files and read-only mounts)."""
    base = _first_existing(path.parent)
    if not base.is_dir():
        raise UsageError(f"{flag} {path}: {base} is a file, not a folder; choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {base} is not writable (permissions or a read-only file system); "
                         f"choose another {flag}")


def check_output_file(path: str | None, flag: str) -> None:
    """A file the run will write at the end: not a folder, and creatable or writable."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name, e.g. {p / 'result.json'}")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag} {path} exists and is not writable; choose another {flag}")
        return
    _check_creatable(p, flag)


def check_output_dir(path: str, flag: str) -> None:
    """A folder the run will write into at the end: not a file, and creatable or writable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path} is not writable (permissions or a read-only file system); "
                             f"choose another {flag}")
        return
    _check_creatable(p, flag)


def resolve_device(name: str | None) -> torch.device:
    """--device: the named device, checked to exist here; None: the GPU when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use e.g. cuda, cuda:1 or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is None or device.type != accelerator.type:  # meta, or a backend without a device here
            raise UsageError(f"--device {name} is not a device this machine computes on; use cuda, cuda:N or cpu")
    return device


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory`'s GPU figure from now (the host figure is the process's lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak resident host memory of this process and, on a GPU, peak allocated GPU memory, in GiB."""
    out = {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss: KiB
    if device.type == "cuda":
        out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 16 MiB chunks (the checkpoints that results name)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_bytes(path: Path) -> int:
    """Total size of the files below a folder."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
