"""--calib_set self: calibration text sampled from the model being pruned."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import main
from data import DataFileError, build_calib_loader
from data.self_calib import sample_from_model


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_same_seed_same_blocks(tiny_mixtral):
    model, tok = _load(tiny_mixtral)
    a = sample_from_model(model, tok, 16, 5, seed=3, batch_size=2)
    b = sample_from_model(model, tok, 16, 5, seed=3, batch_size=2)
    c = sample_from_model(model, tok, 16, 5, seed=4, batch_size=2)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tok.bos_token_id).all()


def test_samples_follow_the_model(tiny_mixtral):
    """Reference sampler: full-sequence forward (no KV cache) and the same seeded multinomial draws."""
    model, tok = _load(tiny_mixtral)
    got = sample_from_model(model, tok, 10, 3, seed=5, batch_size=3)
    gen = torch.Generator().manual_seed(5)
    ids = torch.full((3, 1), tok.bos_token_id)
    with torch.no_grad():
        for _ in range(9):
            probs = torch.softmax(model(ids).logits[:, -1].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    assert torch.equal(got, ids)


def test_self_calibration_loader_and_errors(tiny_mixtral):
    model, tok = _load(tiny_mixtral)
    loader = build_calib_loader("self", tok, 12, 6, 4, 0, seed=1, model=model)
    assert [b["input_ids"].shape for b in loader] == [(4, 12), (2, 12)]
    with pytest.raises(DataFileError, match="n_blocks_for_stat > 0"):
        build_calib_loader("self", tok, 12, 0, 4, 0, model=model)
    with pytest.raises(DataFileError, match="--calib_path is not used"):
        build_calib_loader("self", tok, 12, 2, 4, 0, path="x.json", model=model)


def test_main_with_self_calibration(tiny_mixtral, tmp_path):
    out = tmp_path / "out"
    args = ["--method", "layerwise_pruning", "--r", "4", "--calib_set", "self", "--model_path", str(tiny_mixtral),
            "--output_path", str(out), "--max_block_size", "16", "--n_blocks_for_stat", "4", "--batch_size", "2",
            "--num_workers", "0", "--device", "cpu", "--dtype", "float32"]
    assert main.main(args) == 0
    (result,) = out.iterdir()
    assert result.name.startswith("tiny-mixtral_layerwise_pruning_r4_self_4_")
    info = json.loads((result / "pruning_info.json").read_text())
    assert info["calibration"] == {"n_blocks": 4, "block_size": 16}
    assert AutoModelForCausalLM.from_pretrained(result).config.num_local_experts == 4
