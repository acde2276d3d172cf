"""main.py end to end: outputs, reload with plain transformers, betas, and one-line errors."""

from __future__ import annotations

import json
import re
from datetime import datetime

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import main
from data import build_calib_loader
from method import METHODS

from conftest import save_model


def common(model_path, c4_path, out, *extra, n_blocks=8, device="cpu"):
    return ["--calib_set", "c4", "--calib_path", str(c4_path), "--model_path", str(model_path),
            "--output_path", str(out), "--max_block_size", "48", "--n_blocks_for_stat", str(n_blocks),
            "--batch_size", "4", "--num_workers", "0", "--device", device, "--dtype", "float32", *extra]


def only_result(out):
    dirs = [p for p in out.iterdir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.parametrize("method", ["layerwise_pruning", "progressive_pruning"])
def test_main_prunes_and_checkpoint_reloads(tiny_mixtral, c4_path, tmp_path, capsys, method):
    out = tmp_path / "out"
    assert main.main(["--method", method, "--r", "6", *common(tiny_mixtral, c4_path, out)]) == 0
    result = only_result(out)
    assert result.name.startswith(f"tiny-mixtral_{method}_r6_c4_8_")
    assert f"saved to {result}" in capsys.readouterr().out

    info = json.loads((result / "pruning_info.json").read_text())
    assert info["args"]["method"] == method and info["args"]["r"] == 6
    assert info["calibration"] == {"n_blocks": 8, "block_size": 48}
    assert set(info["layers"]) == {"0", "1"}
    for layer in info["layers"].values():
        assert len(layer["kept_experts"]) == 6 and len(layer["dropped_experts"]) == 2
        assert sorted(layer["kept_experts"] + layer["dropped_experts"]) == list(range(8))
        assert len(layer["loss"]) == 28
        assert min(layer["loss"].values()) == layer["loss"][",".join(map(str, layer["dropped_experts"]))]
    assert info["wall_time_s"] > 0 and info["peak_host_rss_gib"] > 0

    # Plain transformers, no project code: the config says 6 experts and the weights have 6.
    reloaded = AutoModelForCausalLM.from_pretrained(result, dtype=torch.float32).eval()
    assert reloaded.config.num_local_experts == 6
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    tok = AutoTokenizer.from_pretrained(result)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids

    # Identical logits to the in-memory pruned model (same method, same calibration).
    loader = build_calib_loader("c4", tok, 48, 8, 4, 0, seed=42, path=str(c4_path))
    in_memory, _ = METHODS[method](AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval(),
                                   loader, main.parse_args(["--method", method, "--r", "6",
                                                            *common(tiny_mixtral, c4_path, out)]))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, in_memory(ids).logits)
        gen = reloaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)


def test_dynamic_skipping_betas_are_router_medians(tiny_mixtral, c4_path, tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    assert main.main(["--method", "dynamic_skipping", *common(tiny_mixtral, c4_path, out)]) == 0
    result = only_result(out)
    assert result.name.startswith("tiny-mixtral_dynamic_skipping_c4_8_")
    config = json.loads((result / "config.json").read_text())
    info = json.loads((result / "pruning_info.json").read_text())

    # Reference: router outputs of one full forward of the original model on the same blocks.
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    loader = build_calib_loader("c4", tok, 48, 8, 4, 0, seed=42, path=str(c4_path))
    ratios = {i: [] for i in range(2)}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda m, a, o, i=i: ratios[i].append((o[1][:, 1] / o[1][:, 0]).numpy()))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in loader:
            model(input_ids=batch["input_ids"])
    for h in hooks:
        h.remove()
    for i in range(2):
        r = np.concatenate(ratios[i]).astype(np.float64)
        assert r.size == 8 * 48
        assert config["betas"][str(i)] == pytest.approx(float(np.median(r)), rel=1e-6)
        assert info["layers"][str(i)]["beta_mean"] == pytest.approx(float(np.mean(r)), rel=1e-6)
        assert 0 < config["betas"][str(i)] <= 1
    # Weights are untouched.
    reloaded = AutoModelForCausalLM.from_pretrained(result, dtype=torch.float32)
    for a, b in zip(reloaded.parameters(), model.parameters()):
        assert torch.equal(a, b)


class _Fixed(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2026, 1, 2, 3, 4, 5)


def _llama(tmp_path, tokenizer_dir):
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return save_model(cfg, tmp_path / "tiny-llama", tokenizer_dir)


@pytest.mark.parametrize("case,match", [
    ("r_too_big", r"--r 9 is not valid for mixtral blocks with 8 experts and top-2 routing; valid values: 2..8"),
    ("r_below_top_k", r"--r 1 is not valid .* valid values: 2..8"),
    ("no_r", r"needs --r"),
    ("dense_model", r"LlamaForCausalLM .* has no MoE layer .*supported MoE families: .*mixtral"),
    ("missing_data", r"calibration file for --calib_set c4 not found: .*missing.json; download .*allenai/c4"),
    ("malformed_data", r"bad.json: line 1 is not valid JSON"),
    ("too_few_blocks", r"gives only \d+ blocks of 48 tokens .* asks for 100000"),
    ("output_exists", r"output folder .*tiny-mixtral_layerwise_pruning_r6_c4_8_20260102-030405 already exists"),
    ("bad_device", r"--device cuda asked for but no CUDA GPU"),
])
def test_bad_input_one_line_error_and_nothing_written(case, match, tiny_mixtral, c4_path, tmp_path, tokenizer_dir,
                                                       capsys, monkeypatch):
    out = tmp_path / "out"
    model, r, data, n_blocks, device = tiny_mixtral, ["--r", "6"], str(c4_path), 8, "cpu"
    if case == "r_too_big":
        r = ["--r", "9"]
    elif case == "r_below_top_k":
        r = ["--r", "1"]
    elif case == "no_r":
        r = []
    elif case == "dense_model":
        model = _llama(tmp_path, tokenizer_dir)
    elif case == "missing_data":
        data = str(tmp_path / "missing.json")
    elif case == "malformed_data":
        data = str(tmp_path / "bad.json")
        (tmp_path / "bad.json").write_text("{not json\n")
    elif case == "too_few_blocks":
        n_blocks = 100000
    elif case == "output_exists":
        monkeypatch.setattr(main, "datetime", _Fixed)
        (out / "tiny-mixtral_layerwise_pruning_r6_c4_8_20260102-030405").mkdir(parents=True)
    elif case == "bad_device":
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
        device = "cuda"
    args = ["--method", "layerwise_pruning", *r, *common(model, data, out, n_blocks=n_blocks, device=device)]
    capsys.readouterr()  # drop what building the inputs printed
    before = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert main.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(match, err[0]), err[0]
    after = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert after == before  # nothing written, no partial folder


def test_failure_during_save_leaves_nothing(tiny_mixtral, c4_path, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    import model.checkpoint

    monkeypatch.setattr(model.checkpoint, "result_config", boom)  # after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        main.main(["--method", "layerwise_pruning", "--r", "6", *common(tiny_mixtral, c4_path, out)])
    assert list(out.iterdir()) == []


def test_pruning_a_skipping_checkpoint_drops_stale_betas(tiny_mixtral, c4_path, tmp_path):
    config = json.loads((tiny_mixtral / "config.json").read_text())
    config["betas"] = {"0": 0.4, "1": 0.4}
    (tiny_mixtral / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main.main(["--method", "layerwise_pruning", "--r", "6", *common(tiny_mixtral, c4_path, out)]) == 0
    result = only_result(out)
    assert "betas" not in json.loads((result / "config.json").read_text())
    assert json.loads((result / "pruning_info.json").read_text())["removed_stale_betas"] is True
