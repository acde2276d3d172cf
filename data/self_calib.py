"""Data-free calibration: sample the calibration text from the model being pruned.

Each block starts with the BOS token and continues with tokens sampled from the model
itself (temperature 1, no truncation), so the calibration distribution is the model's
own; no file is needed. Seeded: the same seed, model and settings give the same blocks.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from .calib import DataFileError, check_blocks

logger = logging.getLogger(__name__)


def _fits(model, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.8 * free


@torch.no_grad()
def sample_from_model(model, tokenizer, block_size: int, n_blocks: int, seed: int, batch_size: int = 8,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """(n_blocks, block_size) token ids: BOS followed by block_size - 1 sampled tokens."""
    if n_blocks <= 0:
        raise DataFileError("--calib_set self samples a fixed number of blocks: give --n_blocks_for_stat > 0")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataFileError("--calib_set self needs a tokenizer with a BOS or EOS token to start sampling from")
    device = torch.device(device)
    if not _fits(model, device):
        logger.warning("the model does not fit on %s for sampling; sampling on the CPU (slow)", device)
        device = torch.device("cpu")
    home = next(model.parameters()).device
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = []
    # Counts sequences, not batches: with the paper's 128 blocks and batch 8, 16 steps of minutes each say little.
    bar = tqdm(total=n_blocks, desc="Sampling calibration text from the model", unit="seq")
    try:
        for b0 in range(0, n_blocks, batch_size):
            n = min(batch_size, n_blocks - b0)
            ids = torch.full((n, 1), start, dtype=torch.long, device=device)
            past = None
            for _ in range(block_size - 1):
                out = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
                past = out.past_key_values
                probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
            blocks.append(ids.cpu())
            bar.update(n)
    finally:
        bar.close()
        model.to(home)
    return torch.cat(blocks)


class SelfCalibSet:
    """`--calib_set self`: calibration blocks sampled from the model being pruned."""

    name = "self"
    needs_model = True
    default_paths = ("(sampled from the model)",)

    def resolve(self, path: str | None) -> None:
        """No file: refuse --calib_path rather than ignore it."""
        if path is not None:
            raise DataFileError("--calib_path is not used with --calib_set self, which samples from the model")

    def blocks(self, tokenizer, block_size: int, n_blocks: int, seed: int, path: str | None = None, model=None,
               batch_size: int = 8, device="cpu") -> torch.Tensor:
        self.resolve(path)
        if model is None:
            raise ValueError("--calib_set self needs the model")
        blocks = sample_from_model(model, tokenizer, block_size, n_blocks, seed, batch_size, device)
        check_blocks(blocks, tokenizer, "sampling from the model")
        return blocks
