"""Expert pruning and dynamic skipping for MoE LLMs (Lu et al., ACL 2024, arXiv 2402.14800).

    python main.py --method layerwise_pruning --r 6 --calib_set c4 --model_path Mixtral-8x7B-v0.1

writes <output_path>/<run name>_<timestamp>/ holding a Hugging Face checkpoint, its tokenizer and
pruning_info.json (every decision). The run name is <model>_<method>[_r<r>]_<calib_set>_<n_blocks>,
followed by the settings a sweep varies when they differ from their defaults:
_len<max_block_size>, _seed<seed>, _<search>, _<dtype>, _fatt2.

The run works in a hidden staging folder, <output_path>/.<run name>.<settings hash>.partial/,
renamed into place at the end. A run that is killed (SIGKILL, out of memory, a failure while
saving) leaves there the results of its finished layers, and the same command run again
continues from them; Ctrl-C (exit code 130) and SIGTERM (143) keep them too, or remove the
folder when it holds none. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import importlib.util
import itertools
import json
import logging
import logging.handlers
import os
import re
import shlex
import shutil
import signal
import sys
import time
import typing
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402
from transformers.utils.hub import convert_file_size_to_int  # noqa: E402

from cli import UsageError, fail, one_line, peak_memory, reset_peak_memory, resolve_device  # noqa: E402
from data import DATASETS, DataFileError, block_size_for, calib_blocks, make_loader  # noqa: E402
from method import METHODS  # noqa: E402
from model.adapters import MoEError, find_moe_blocks  # noqa: E402
from model.card import (INFO_FILE, add_original_numbering, input_license, model_card, read_expert_map,  # noqa: E402
                        summary_table)
from model.checkpoint import save_checkpoint, save_pretrained  # noqa: E402
from model.loading import DTYPES  # noqa: E402
from model.profiling import Profile, profiling  # noqa: E402
from model.runner import LayerJournal, journaling  # noqa: E402
from model.streaming import LayerStream, NotStreamable  # noqa: E402

logger = logging.getLogger("main")


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that the staging folder is cleaned up as on Ctrl-C. A SystemExit:
    handlers that swallow every other exception re-raise it (tqdm's logging handler does, when the signal
    lands while it writes a log line)."""


def _setting(default=MISSING, help: str = "", **flag):
    """A RunConfig field with its command-line help (and argparse extras such as `choices`): the field's
    default is the flag's, written once."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class RunConfig:
    """Every setting of a run, one --flag each (`build_parser`); saved in pruning_info.json under "args"."""

    method: str = _setting(
        choices=list(METHODS),
        help="layerwise_pruning: keep the r experts per layer that best reproduce the original layer output; "
             "progressive_pruning: the same, layer after layer on the already pruned model; dynamic_skipping: "
             "calibrate per-layer betas for skipping the 2nd expert")
    calib_set: str = _setting(
        choices=list(DATASETS),
        help="calibration set: " + "; ".join(f"{k}: {v.default_paths[0]}" for k, v in DATASETS.items()))
    model_path: str = _setting(help="checkpoint folder (or hub id) of the model to prune")
    r: int | None = _setting(None, "number of experts to keep per MoE layer (pruning methods)")
    output_path: str = _setting("./output", "folder under which the run's result folder is created; the same "
                                            "command run again after a kill continues the killed run there")
    max_block_size: int = _setting(2048, "tokens per calibration sequence, at most the tokenizer's model_max_length")
    n_blocks_for_stat: int = _setting(128, "number of calibration sequences; 0 or negative uses the whole file")
    batch_size: int = _setting(8, "sequences per forward batch; the loss sums one Frobenius norm per batch")
    num_workers: int = _setting(4, "DataLoader workers for the calibration batches")
    seed: int = _setting(42, "seed for document sampling and everything random")
    use_flash_attention_2: bool = _setting(False, "load the model with Flash Attention 2")
    calib_path: str | None = _setting(None, "calibration file to read instead of the calibration set's default path")
    device: str | None = _setting(None, "compute device, e.g. cuda, cuda:1, cpu (default: the GPU when there is "
                                        "one). Layers are moved there one at a time; the model itself stays in "
                                        "host memory")
    dtype: str = _setting("bfloat16", "dtype to load the model in (bfloat16 as the paper)",
                          choices=[k for k in DTYPES if k != "auto"])
    search: str = _setting("auto", "how to find the kept set: exhaustive tries every drop set (the paper); beam "
                                   "scales to many experts (greedy elimination with a beam, then swap refinement); "
                                   "auto: exhaustive when there are at most --exhaustive_limit candidate sets, "
                                   "else beam", choices=["auto", "exhaustive", "beam"])
    exhaustive_limit: int = _setting(20000, "largest number of candidate drop sets searched exhaustively with "
                                            "--search auto")
    beam_width: int = _setting(4, "beam width of --search beam")
    swap_rounds: int = _setting(4, "at most this many swap-refinement rounds of beam")
    load: str = _setting(
        "auto", choices=["auto", "stream", "in_memory"],
        help="stream: read each decoder layer from the safetensors shards when its turn comes and write it out "
             "when done, so host memory holds a few layers whatever the model size; in_memory: load the whole "
             "model first; auto: stream when the checkpoint and the method allow it, else in memory, saying why "
             "(docs/streaming.md)")
    max_shard_size: str = _setting("5GB", "largest weight file of the result, e.g. 5GB or 500MB; a streamed run "
                                          "holds at most one such shard of finished layers in host memory")
    states_budget_gib: float | None = _setting(
        None, "GiB of GPU memory for the calibration states (each batch's hidden states entering the current "
              "layer); when they do not fit they stay in page-locked host memory, each batch copied to the GPU "
              "while the previous one computes (default: a quarter of the GPU's memory)")
    stats_budget_gib: float | None = _setting(
        None, "GiB of GPU memory for the beam search's per-token statistics; the calibration batches beyond it "
              "keep theirs in page-locked host memory, copied to the GPU for every scoring pass, overlapped "
              "with it (default: a quarter of the GPU's memory; bytes per token: docs/benchmarks.md)")
    profile: bool = _setting(False, "split each layer's time into phases (load, transfer, forward, expert outputs, "
                                    "statistics, search, save), synchronising the GPU at every phase boundary; "
                                    "logged and recorded under `timing` in pruning_info.json (per-layer totals "
                                    "are recorded in any case)")


def build_parser() -> argparse.ArgumentParser:
    """One --flag per RunConfig field: its type, default, help and choices come from the field."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(RunConfig)
    for f in fields(RunConfig):
        kw = dict(f.metadata)
        if hints[f.name] is bool:  # an on/off switch, off by default
            p.add_argument(f"--{f.name}", action="store_true", **kw)
            continue
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])  # X | None
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
            if f.default is not None:
                kw["help"] += " (default: %(default)s)"
        p.add_argument(f"--{f.name}", type=kind, **kw)
    return p


def parse_args(argv=None) -> RunConfig:
    ns = build_parser().parse_args(argv)
    return RunConfig(**vars(ns))


_DEFAULTS = {f.name: f.default for f in fields(RunConfig)}


def run_name(cfg: RunConfig) -> str:
    """<model>_<method>[_r<r>]_<calib_set>_<n_blocks>, then the settings a sweep varies when not default."""
    model_name = Path(cfg.model_path.rstrip("/")).name
    r = f"_r{cfg.r}" if cfg.method.endswith("_pruning") else ""
    sweep = [f"len{cfg.max_block_size}" if cfg.max_block_size != _DEFAULTS["max_block_size"] else "",
             f"seed{cfg.seed}" if cfg.seed != _DEFAULTS["seed"] else "",
             cfg.search if cfg.search != _DEFAULTS["search"] and r else "",
             cfg.dtype if cfg.dtype != _DEFAULTS["dtype"] else "",
             "fatt2" if cfg.use_flash_attention_2 else ""]
    return "_".join([f"{model_name}_{cfg.method}{r}", cfg.calib_set, str(cfg.n_blocks_for_stat), *filter(None, sweep)])


def save_dir_name(cfg: RunConfig, now: datetime | None = None) -> str:
    """The result folder's name; a folder of that name made in the same second gets -2, -3, ... (Staging.publish)."""
    return f"{run_name(cfg)}_{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------------------
# Checks of the flags and inputs, all before anything is loaded, computed or written.


def check_args(cfg: RunConfig) -> None:
    pruning = cfg.method.endswith("_pruning")
    if pruning and cfg.r is None:
        raise UsageError(f"--method {cfg.method} needs --r, the number of experts to keep per MoE layer")
    if pruning and cfg.r < 1:
        raise UsageError(f"--r must be at least 1, got {cfg.r}")
    if not pruning and cfg.r is not None:
        logger.warning("--r is not used by %s", cfg.method)
    if cfg.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.max_block_size < 1:
        raise UsageError(f"--max_block_size must be at least 1, got {cfg.max_block_size}")
    if cfg.beam_width < 1 or cfg.swap_rounds < 0 or cfg.exhaustive_limit < 1:
        raise UsageError("--beam_width and --exhaustive_limit must be >= 1 and --swap_rounds >= 0")
    if cfg.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {cfg.num_workers}")
    for flag in ("states_budget_gib", "stats_budget_gib"):
        if getattr(cfg, flag) is not None and not getattr(cfg, flag) >= 0:
            raise UsageError(f"--{flag} must be a number of GiB >= 0, got {getattr(cfg, flag)}")
    if not 0 <= cfg.seed < 2**32:  # numpy's and torch's seed range (transformers.set_seed seeds both)
        raise UsageError(f"--seed must be in 0..{2**32 - 1}, got {cfg.seed}")
    try:
        if convert_file_size_to_int(cfg.max_shard_size) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--max_shard_size must be a size such as 5GB or 500MB, got {cfg.max_shard_size!r}") from None
    if cfg.use_flash_attention_2 and importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--use_flash_attention_2 needs the flash_attn package, which is not installed: "
                         "pip install flash-attn, or leave the flag out")


# A hub id is owner/name. Anything else that does not exist (a bare name, ./x, /x, a/b/c, or owner/name
# whose owner is a local folder) is taken as a missing local folder: no hub lookup, no retries.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_folder(model_path: str) -> Path | None:
    """The local checkpoint folder that --model_path names (checked), or None for a hub id."""
    path = Path(model_path).expanduser()
    if not path.exists():
        if _HUB_ID.fullmatch(model_path) and not Path(model_path.split("/")[0]).exists():
            return None
        raise UsageError(f"no such folder: {model_path} (--model_path)")
    if not path.is_dir():
        raise UsageError(f"--model_path {model_path} is a file; give the checkpoint folder")
    if not (path / "config.json").is_file():
        raise UsageError(f"no config.json in {model_path}: not a Hugging Face checkpoint folder")
    return path


def check_model(cfg: RunConfig, folder: Path | None = None):
    """Read the config and build the model skeleton on the meta device: family and --r checks cost nothing."""
    where = folder / "config.json" if folder is not None else f"--model_path {cfg.model_path}"
    try:
        config = AutoConfig.from_pretrained(cfg.model_path)
    except Exception as e:  # bad JSON, unknown model_type, a mistyped value (typed config classes): one line
        raise UsageError(f"cannot read the model config {where}: {one_line(e, limit=400)}") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (TypeError, ValueError) as e:  # e.g. not a causal LM, inconsistent sizes
        raise UsageError(f"cannot build a model from {where}: {one_line(e, limit=400)}") from None
    blocks = find_moe_blocks(skeleton)
    if cfg.method.endswith("_pruning"):
        for adapter, block in blocks.values():
            adapter.check_r(block, cfg.r)
    else:
        from method.skip_calibration import check_skippable
        check_skippable(skeleton)
    if folder is not None:
        check_weights(folder)
    return config


def check_weights(folder: Path) -> None:
    """Weights present, every shard the index names present, and no safetensors file cut short."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{index} is not a weight index (a JSON object with a 'weight_map')") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise UsageError(f"{folder} lacks {len(missing)} of the {len(shards)} weight files its index names, "
                             f"e.g. {missing[0]}")
        files = [folder / name for name in shards]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        return  # pickled weights: read (and checked) by torch at load time
    else:
        raise UsageError(f"no weights in {folder}: expected model.safetensors, or the shards named by "
                         f"model.safetensors.index.json")
    for f in files:
        check_safetensors(f)


def check_safetensors(path: Path) -> None:
    """The tensors a safetensors header describes must end exactly where the file does (reads the header only)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
            end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            end = None
    if end != size:
        found = f"its header describes {end} bytes" if end is not None else "no readable header"
        raise UsageError(f"{path} is truncated or corrupt ({size} bytes, {found}): copy or download it again")


def load_tokenizer(model_path: str, folder: Path | None):
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # missing or broken tokenizer files: one line
        if folder is not None and not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                                                          "vocab.json", "tokenizer_config.json")):
            raise UsageError(f"no tokenizer files in {folder} (tokenizer.json, tokenizer.model, vocab.json): copy "
                             f"them from the model it was made from") from None
        raise UsageError(f"cannot load the tokenizer of {model_path}: {one_line(e, limit=400)}") from None


def check_vocab(blocks: torch.Tensor, config) -> None:
    vocab = config.get_text_config().vocab_size
    if int(blocks.max()) >= vocab:
        raise UsageError(f"the tokenizer gives token id {int(blocks.max())} but the model has {vocab} embeddings: "
                         f"use the model's own tokenizer files")


def prepare_output(output_path: str) -> tuple[Path, list[Path]]:
    """Create --output_path; returns it and the folders this created (removed again if the run leaves nothing)."""
    path = Path(output_path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_path {path} is a file, not a folder")
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker is not None else e.strerror
        raise UsageError(f"cannot create --output_path {path}: {why}") from None
    return path, missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders, innermost first, as long as they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


# ----------------------------------------------------------------------------------------------------------
# The staging folder: exclusive to one live run, kept for a resumed one, renamed into place at the end.

STAGING_SUFFIX = ".partial"


def run_settings(cfg: RunConfig, model_dir: Path | None, calib_file: Path | None) -> dict:
    """What the result depends on: the settings, the input files (path, size, mtime) and the library versions.

    The staging folder is named by its hash, so only the same command on the same inputs resumes a run.
    """
    def files(path: Path) -> dict:
        listed = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return {"path": str(path.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                                      for p in listed]}

    # How the model is loaded, where the work is kept, what is timed and how the result is sharded do not change
    # the result's tensors: not part of the key.
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("output_path", "num_workers", "load", "max_shard_size", "states_budget_gib",
                             "stats_budget_gib", "profile")}
    settings["model_path"] = files(model_dir) if model_dir is not None else cfg.model_path
    settings["calib_path"] = files(calib_file) if calib_file is not None else None
    settings["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    return json.loads(json.dumps(settings))  # as read back from run.json


def _flock(path: Path, create: bool = False) -> int:
    """An fd holding an exclusive flock on `path`, or BlockingIOError. The kernel drops the lock when the
    process dies, even by SIGKILL, so a folder whose lock can be taken belongs to no live run."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _own(fd: int) -> int:
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for messages: "already running (pid N)"
    return fd


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class Staging:
    """<output>/.<run name>.<settings hash>.partial/, the working folder of one run:

        lock       flock()ed by the live run, holds its pid
        run.json   the settings the hash is of
        calib.pt   the calibration token ids, so that a resumed run calibrates on the same tokens
        layers/    the finished layers' results (model.runner.LayerJournal)
        result/    the checkpoint being written, renamed to <output>/<name>_<timestamp>/ at the end
    """

    def __init__(self, path: Path, lock_fd: int):
        self.path, self._lock_fd = path, lock_fd
        self.journal = LayerJournal(path / "layers")
        self.result = path / "result"

    @classmethod
    def open(cls, output: Path, name: str, settings: dict) -> "Staging":
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = output / f".{name}.{key}{STAGING_SUFFIX}"
        staging = cls(path, cls._create(path) or cls._take_over(path))
        run_json = path / "run.json"
        if run_json.exists() and json.loads(run_json.read_text()) != settings:
            staging.close(keep=True)
            raise UsageError(f"{path} holds another run's state (see its run.json); delete it")
        with staging:  # a failure here keeps the folder if it holds finished layers, else removes it
            _write_atomic(run_json, lambda tmp: tmp.write_text(json.dumps(settings, indent=1, sort_keys=True)))
            shutil.rmtree(staging.result, ignore_errors=True)  # a killed run's half-written checkpoint
        return staging

    @staticmethod
    def _create(path: Path) -> int | None:
        """Make the folder with its lock already held (built aside, renamed in: never seen unlocked); None if
        it exists. Making it is also the probe that --output_path is writable."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.new")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a dead process that had our pid
        try:
            tmp.mkdir()
            fd = _own(_flock(tmp / "lock", create=True))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(f"cannot write into --output_path {path.parent}: {e.strerror}") from None
        try:
            os.rename(tmp, path)  # atomic; fails when `path` exists (it is never empty: it holds its lock)
            return fd
        except OSError as e:
            os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return None

    @staticmethod
    def _take_over(path: Path) -> int:
        """Lock an existing folder: the same command killed earlier (resume), or still running (refused)."""
        try:
            return _own(_flock(path / "lock"))
        except FileNotFoundError:
            raise UsageError(f"{path} exists but has no lock file (not made by this version, or being "
                             f"removed); delete it if no run uses it") from None
        except BlockingIOError:
            raise UsageError(f"the same command is already running (pid {_lock_owner(path / 'lock')}) into "
                             f"{path}: wait for it to finish, or stop it and run the command again to continue "
                             f"it") from None

    def calibration(self, build) -> torch.Tensor:
        """The calibration blocks this folder holds (a resumed run's), or build()'s, kept for a later resume."""
        f = self.path / "calib.pt"
        if f.exists():
            return torch.load(f)
        blocks = build()
        _write_atomic(f, lambda tmp: torch.save(blocks, tmp))
        return blocks

    def publish(self, final: Path) -> Path:
        """Move the finished checkpoint to `final` (or final-2, -3, ... if a run of the same name and second
        took it) and remove the staging folder."""
        for n in itertools.count(1):
            target = final if n == 1 else final.with_name(f"{final.name}-{n}")
            try:
                target.mkdir()  # reserved: exclusive even against a run publishing at the same instant
                break
            except FileExistsError:
                continue
        os.replace(self.result, target)  # replaces the empty reserved folder, atomically
        self.close(keep=False)
        return target

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """After a failure or an interrupt: keep the folder if it holds finished layers (and say how to
        continue), else remove it."""
        if exc_type is not None:
            finished = self.journal.finished()
            self.close(keep=bool(finished))
            if finished:
                print(f"kept {self.path} with the results of {len(finished)} finished layers "
                      f"({', '.join(map(str, finished))}): run the same command again to continue from there",
                      file=sys.stderr)

    def close(self, keep: bool) -> None:
        shutil.rmtree(self.result if keep else self.path, ignore_errors=True)
        os.close(self._lock_fd)


def report_stale(output: Path, own: Path) -> None:
    """Name the staging folders in `output` whose run is dead; remove those that hold no finished layer."""
    for path in sorted(output.glob(f".*{STAGING_SUFFIX}*")):
        if path == own or not path.is_dir():
            continue
        try:
            fd = _flock(path / "lock")
        except BlockingIOError:
            continue  # a live run's
        except FileNotFoundError:
            logger.warning("%s looks like a staging folder but has no lock file (an older version's?): delete it "
                           "if no run uses it", path)
            continue
        try:
            finished = LayerJournal(path / "layers").finished()
            if finished:
                logger.warning("%s is the staging folder of a dead run with %d finished layers: run its command "
                               "again to continue it (its settings are in run.json there), or delete it", path,
                               len(finished))
            else:
                shutil.rmtree(path)
                logger.warning("removed %s, the staging folder of a dead run that had finished no layer", path)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# The run.


def model_kwargs(cfg: RunConfig) -> dict:
    return {"attn_implementation": "flash_attention_2"} if cfg.use_flash_attention_2 else {}


def load_model(cfg: RunConfig):
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=DTYPES[cfg.dtype], **model_kwargs(cfg))
    model.eval()
    return model


# Methods that change a decoder layer only while LayerRunner.iter_layers holds it, and walk the layers once: a
# streamed layer is written out when the walk leaves it. random/frequency/reap_pruning prune every layer after
# their walk (random_pruning has none), so they load the model into host memory.
STREAMED_METHODS = ("layerwise_pruning", "progressive_pruning", "dynamic_skipping")


def plan_stream(cfg: RunConfig, folder: Path | None, config) -> tuple[LayerStream | None, str | None]:
    """The plan of a streamed model (model/streaming.py), or None and why the run loads it into host memory."""
    if cfg.load == "in_memory":
        return None, "--load in_memory"
    try:
        if folder is None:
            raise NotStreamable(f"{cfg.model_path} is a hub id; streaming reads the shards of a local folder")
        if cfg.method not in STREAMED_METHODS:
            raise NotStreamable(f"{cfg.method} prunes the layers after its layer walk")
        if DATASETS[cfg.calib_set].needs_model:
            raise NotStreamable(f"--calib_set {cfg.calib_set} samples the calibration text from the whole model")
        return LayerStream.plan(cfg.model_path, config, DTYPES[cfg.dtype], **model_kwargs(cfg)), None
    except NotStreamable as e:
        if cfg.load == "stream":
            raise UsageError(f"--load stream cannot stream {cfg.model_path}: {e}; use --load in_memory") from None
        logger.warning("loading the whole model into host memory: %s", e)
        return None, str(e)


def run(cfg: RunConfig, inputs_valid=lambda: None) -> Path:
    """Check everything, then prune (or calibrate skipping) and save; returns the result folder.

    `inputs_valid()` is called once the inputs have passed every check made before the long work.
    """
    start = time.time()
    check_args(cfg)
    device = resolve_device(cfg.device)
    cfg.device = str(device)
    if cfg.use_flash_attention_2 and device.type != "cuda":
        raise UsageError(f"--use_flash_attention_2 needs a CUDA device, not --device {device}")
    logger.info("config: %s", json.dumps(asdict(cfg)))
    model_dir = model_folder(cfg.model_path)
    config = check_model(cfg, model_dir)
    input_map = read_expert_map(model_dir)  # the input's experts in the original model's numbering, if pruned
    stream, in_memory_why = plan_stream(cfg, model_dir, config)
    tokenizer = load_tokenizer(cfg.model_path, model_dir)
    block_size_for(tokenizer, cfg.max_block_size)  # refuses blocks without context before anything is loaded
    calib_file = DATASETS[cfg.calib_set].resolve(cfg.calib_path)
    output, created = prepare_output(cfg.output_path)
    save_path = output / save_dir_name(cfg)
    try:
        with Staging.open(output, run_name(cfg), run_settings(cfg, model_dir, calib_file)) as staging:
            set_seed(cfg.seed)
            model = None
            if DATASETS[cfg.calib_set].needs_model:  # `self` samples from the model: load it first
                inputs_valid()
                model = load_model(cfg)
            blocks = staging.calibration(lambda: calib_blocks(
                cfg.calib_set, tokenizer, cfg.max_block_size, cfg.n_blocks_for_stat, cfg.seed, path=cfg.calib_path,
                model=model, batch_size=cfg.batch_size, device=device))
            check_vocab(blocks, config)
            inputs_valid()
            report_stale(output, staging.path)
            logger.info("calibration: %d blocks of %d tokens", blocks.shape[0], blocks.shape[1])
            resumed = staging.journal.finished()
            if resumed:
                logger.info("continuing %s: layers %s were finished by an earlier run of this command",
                            staging.path, ", ".join(map(str, resumed)))
            if model is None:
                model = (stream.open(staging.result, convert_file_size_to_int(cfg.max_shard_size)).model
                         if stream is not None else load_model(cfg))
            reset_peak_memory(device)

            # finished layers are recorded in the journal and replayed on a rerun; a streamed layer walk reads and
            # writes the layers; the runner times every layer (phases with --profile)
            profile = Profile(device, phases=cfg.profile)
            with journaling(staging.journal), profiling(profile), (stream if stream is not None else nullcontext()):
                model, info = METHODS[cfg.method](model, make_loader(blocks, cfg.batch_size, cfg.num_workers), cfg)

            record = {
                "args": asdict(cfg),
                "command": command_line(cfg),
                "calibration": {"n_blocks": blocks.shape[0], "block_size": blocks.shape[1]},
                "loading": ({"mode": "stream"} if stream is not None else
                            {"mode": "in_memory", "reason": in_memory_why}),
                **info,
                "wall_time_s": time.time() - start,
                "timing": profile.report(),
                **peak_memory(device),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            }
            if resumed:
                record["resumed_layers"] = resumed  # results of the killed run (the wall time is this run's)
            add_original_numbering(record, input_map, {str(i): adapter.num_experts(block)
                                                       for i, (adapter, block) in find_moe_blocks(model).items()})
            save(model, tokenizer, record, staging.result, stream.save_weights if stream is not None else
                 partial(save_pretrained, max_shard_size=cfg.max_shard_size))
            return staging.publish(save_path)
    finally:
        _remove_empty(created)  # the output folders this run made, if it leaves nothing in them


def save(model, tokenizer, record: dict, save_path: Path, write_weights) -> None:
    """Write the checkpoint, its tokenizer, pruning_info.json and the model card README.md into save_path (the
    staging folder's result/). config.json and the tokenizer files come from the input folder (model/checkpoint.py
    says why); write_weights(model, save_path) writes the weights (save_checkpoint's writer)."""
    source = record["args"]["model_path"]
    save_checkpoint(model, tokenizer, source, save_path, write_weights)
    (save_path / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (save_path / "README.md").write_text(model_card(record, input_license(Path(source).expanduser())))


def command_line(cfg: RunConfig) -> str:
    """The main.py command of this run: the required flags and those that differ from their defaults, but
    --output_path (where the result went does not change it)."""
    flags = []
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        if value == f.default or f.name == "output_path":
            continue
        flags += [f"--{f.name}"] if value is True else [f"--{f.name}", str(value)]
    return shlex.join(["python", "main.py", *flags])


# ----------------------------------------------------------------------------------------------------------
# Command line: held-back logs, signals, exit codes.


@contextmanager
def cli_logging():
    """INFO logs on stderr, held back until `release()`: bad input found before then prints only its error.

    transformers' own log records go the same way (through the root logger) while this is active. Once
    released, log lines go through tqdm (`logging_redirect_tqdm`): a line logged while a progress bar is
    drawn clears the bar, starts on a line of its own, and the bar is drawn again below it.
    """
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    held = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1, target=stream,
                                          flushOnClose=False)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(held)
    transformers.logging.disable_default_handler()
    transformers.logging.enable_propagation()

    redirect = ExitStack()

    def release():
        if held in root.handlers:
            held.flush()
            root.removeHandler(held)
            root.addHandler(stream)
            redirect.enter_context(logging_redirect_tqdm())  # replaces `stream` with a tqdm.write handler

    try:
        yield release
    finally:
        redirect.close()  # puts `stream` back, removed below
        root.removeHandler(held)
        root.removeHandler(stream)
        root.setLevel(level)
        transformers.logging.disable_propagation()
        transformers.logging.enable_default_handler()


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated in the main thread (once; a second SIGTERM during the cleanup is ignored)."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    with cli_logging() as release_logs, sigterm_raises():
        try:
            save_path = run(cfg, inputs_valid=release_logs)
        except (UsageError, DataFileError, MoEError) as e:
            return fail("main.py", e)
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr)
            return 130
        except Terminated:
            print("terminated (SIGTERM)", file=sys.stderr)
            return 143
        except BaseException:
            release_logs()  # what led to a crash is shown before its traceback
            raise
    print(summary_table(json.loads((save_path / INFO_FILE).read_text())))
    print(f"saved to {save_path} (what was done and how to load it: its README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
