"""Calibration sets, sampled as the paper's code does.

Documents are shuffled with the seed (numpy `default_rng(seed).permutation`, which is what
`datasets.Dataset.shuffle(seed=...)` does), the first `n_blocks_for_stat * 16` are
tokenized, the token lists are concatenated per group of 1000 documents (the batch of the
original `datasets.map(group_texts, batched=True)`) and cut into blocks of
`min(tokenizer.model_max_length, max_block_size)` tokens, and the first
`n_blocks_for_stat` blocks are kept (all of them when it is <= 0).
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import os
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import transformers

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_PER_BLOCK = 16  # documents sampled per requested block (original code)
GROUP_DOCS = 1000  # documents concatenated together (datasets.map default batch size)


class DataFileError(ValueError):
    """A calibration or benchmark data file is missing, malformed or too small."""


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """The `field` of every record of a JSON-lines file (plain, .gz or .xz) or a JSON array file."""
    path = Path(path)
    fmt = "JSON lines with a 'text' field (the C4 shard format) or a JSON array of {\"text\": ...}"
    try:
        with _open_text(path) as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataFileError(f"{path} is not valid JSON ({e}); expected {fmt}") from None
                numbered = list(enumerate(records, 1))
            else:
                numbered = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            numbered.append((n, json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise DataFileError(f"{path}: line {n} is not valid JSON ({e.msg}); expected {fmt}") from None
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataFileError(f"{path} cannot be read ({e}); expected {fmt}") from None
    texts = []
    for n, rec in numbered:
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise DataFileError(f"{path}: record {n} has no string '{field}' field; expected {fmt}")
        texts.append(rec[field])
    if not texts:
        raise DataFileError(f"{path} holds no documents; expected {fmt}")
    return texts


@contextmanager
def quiet_tokenizer():
    # Long documents are cut into blocks afterwards; the "sequence longer than" warning is noise.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def block_size_for(tokenizer, max_block_size: int) -> int:
    return min(int(tokenizer.model_max_length), max_block_size)


def sample_blocks(texts: list[str], tokenizer, block_size: int, n_blocks: int, seed: int,
                  source: str = "the calibration set") -> torch.Tensor:
    """(n_blocks, block_size) token ids sampled as the paper's code (see module doc)."""
    order = np.random.default_rng(seed).permutation(len(texts))
    if n_blocks > 0:
        order = order[: n_blocks * DOCS_PER_BLOCK]
    docs = [texts[i] for i in order]
    with quiet_tokenizer():
        ids = tokenizer(docs)["input_ids"]
    blocks: list[list[int]] = []
    for g in range(0, len(ids), GROUP_DOCS):
        tokens = list(chain.from_iterable(ids[g: g + GROUP_DOCS]))
        blocks.extend(tokens[i: i + block_size] for i in range(0, len(tokens) - block_size + 1, block_size))
    if n_blocks > 0:
        if len(blocks) < n_blocks:
            raise DataFileError(
                f"{source} gives only {len(blocks)} blocks of {block_size} tokens from {len(docs)} documents, "
                f"but --n_blocks_for_stat asks for {n_blocks}; lower --n_blocks_for_stat or --max_block_size, "
                f"or use a larger file"
            )
        blocks = blocks[:n_blocks]
    if not blocks:
        raise DataFileError(f"{source} holds fewer than {block_size} tokens; lower --max_block_size")
    return torch.tensor(blocks, dtype=torch.long)


@dataclass(frozen=True)
class FileCalibSet:
    """A calibration set read from a data file."""

    name: str
    default_paths: tuple[str, ...]  # tried in order, relative to the repo root
    how_to_get: str

    def resolve(self, path: str | None) -> Path:
        candidates = [Path(path)] if path else [REPO_ROOT / p for p in self.default_paths]
        for c in candidates:
            if c.is_file():
                return c
        where = str(candidates[0]) if path else " or ".join(str(c) for c in candidates)
        raise DataFileError(f"calibration file for --calib_set {self.name} not found: {where}; {self.how_to_get}")

    needs_model = False

    def blocks(self, tokenizer, block_size: int, n_blocks: int, seed: int, path: str | None = None,
               **_unused) -> torch.Tensor:
        file = self.resolve(path)
        logger.info("reading calibration documents from %s", file)
        return sample_blocks(read_texts(file), tokenizer, block_size, n_blocks, seed, source=str(file))


def _collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack(rows)}


def make_loader(blocks: torch.Tensor, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of `batch_size` blocks in order (no shuffle, last batch kept), as the original loader.

    The blocks are already in memory, so workers beyond the CPU count only add processes.
    """
    workers = min(num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return torch.utils.data.DataLoader(list(blocks), batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=workers, collate_fn=_collate)

