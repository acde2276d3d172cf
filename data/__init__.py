"""Calibration data registry: `DATASETS` gives the CLI its `--calib_set` choices."""

from __future__ import annotations

import torch

from .bpe import save_tokenizer, train_bpe_tokenizer
from .calib import DataFileError, FileCalibSet, block_size_for, make_loader, read_texts, sample_blocks
from .self_calib import SelfCalibSet

DATASETS = {
    "c4": FileCalibSet(
        name="c4",
        default_paths=("data/c4-train.00000-of-01024.json", "data/c4-train.00000-of-01024.json.gz"),
        how_to_get="download en/c4-train.00000-of-01024.json.gz from https://huggingface.co/datasets/allenai/c4 "
                   "into data/ (gzipped is fine), or pass --calib_path FILE (JSON lines with a 'text' field)",
    ),
    "math": FileCalibSet(
        name="math",
        default_paths=("data/math_pretrain_style.json",),
        how_to_get="build it from the MATH train split with `python data/math_calib_construction.py "
                   "--dataset_path DIR` (MATH: https://github.com/hendrycks/math), or pass --calib_path FILE "
                   "(a JSON array of {\"text\": ...})",
    ),
    "self": SelfCalibSet(),
}


def calib_blocks(dataset: str, tokenizer, max_block_size: int, n_blocks_for_stat: int, seed: int = 42,
                 path: str | None = None, model=None, batch_size: int = 8, device="cpu") -> torch.Tensor:
    """(n_blocks, block_size) token ids of a calibration set, checked (DataFileError when degenerate)."""
    block_size = block_size_for(tokenizer, max_block_size)
    return DATASETS[dataset].blocks(tokenizer, block_size, n_blocks_for_stat, seed, path=path, model=model,
                                    batch_size=batch_size, device=device)


def build_calib_loader(dataset: str, tokenizer, max_block_size: int, n_blocks_for_stat: int, batch_size: int,
                       num_workers: int, seed: int = 42, path: str | None = None, model=None, device="cpu"):
    """DataLoader of calibration blocks, as the original `build_calib_loader`, plus a file path
    (`path`) and, for `self`, the model to sample from and the device to sample on."""
    blocks = calib_blocks(dataset, tokenizer, max_block_size, n_blocks_for_stat, seed, path=path, model=model,
                          batch_size=batch_size, device=device)
    return make_loader(blocks, batch_size, num_workers)


__all__ = ["DATASETS", "DataFileError", "block_size_for", "build_calib_loader", "calib_blocks", "read_texts",
           "sample_blocks", "make_loader", "save_tokenizer", "train_bpe_tokenizer"]
