"""main.py end to end: outputs, reload with plain transformers, betas, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from datetime import datetime

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import main
from data import build_calib_loader

from conftest import save_model, tiny_mixtral_config
from reference import best, brute_force_layerwise, brute_force_progressive, pruned_mixtral_moe

BRUTE_FORCE = {"layerwise_pruning": brute_force_layerwise, "progressive_pruning": brute_force_progressive}


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
    assert info["wall_time_s"] > 0 and info["peak_host_rss_gib"] > 0

    # Reference: brute force over all 28 drop sets per layer with full block forwards of the original model
    # (tests/reference.py), on the calibration blocks the command asks for (C4 file, seed 42, 8 x 48 tokens,
    # batches of 4).
    tok = AutoTokenizer.from_pretrained(result)
    original = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval()
    batches = [b["input_ids"] for b in build_calib_loader("c4", tok, 48, 8, 4, 0, seed=42, path=str(c4_path))]
    expected = BRUTE_FORCE[method](original, batches, 6)
    for l, ref in expected.items():
        layer = info["layers"][str(l)]
        assert layer["dropped_experts"] == list(best(ref)), f"layer {l}"
        assert layer["kept_experts"] == [e for e in range(8) if e not in best(ref)]
        assert set(layer["loss"]) == {",".join(map(str, d)) for d in ref}
        for drop, loss in ref.items():  # float32 blocks, float64 norms: rounding of the block outputs only
            assert layer["loss"][",".join(map(str, drop))] == pytest.approx(loss, rel=1e-6), (l, drop)

    # Plain transformers, no project code: the config says 6 experts and the weights have 6.
    reloaded = AutoModelForCausalLM.from_pretrained(result, dtype=torch.float32).eval()
    assert reloaded.config.num_local_experts == 6
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids

    # The reloaded checkpoint computes the original model with the dropped experts taken out of its routers
    # (their logits -> -inf). Float32 rounding only: the softmax runs over 6 logits instead of 8 with two
    # at -inf, and the experts run in other groupings; 1e-5 on logits of order 1.
    hooks = [layer.mlp.register_forward_hook(
        lambda m, a, o, d=tuple(info["layers"][str(l)]["dropped_experts"]): pruned_mixtral_moe(m, a[0], d))
        for l, layer in enumerate(original.model.layers)]
    try:
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
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
        # Calibration skip rate: the tokens with w2/w1 < beta. The run's layer-by-layer forwards and this full
        # forward may round a ratio next to the median the other way: at most two of the 384 switch sides.
        rate = float(np.mean(r < np.median(r)))
        assert info["layers"][str(i)]["calib_skip_rate"] == pytest.approx(rate, abs=2 / r.size)
        assert 0.4 < rate <= 0.5  # below the median: half the tokens, fewer with ties
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


def _copy_model(src, dst, drop=(), edit_config=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        config.update(edit_config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


# Each bad input: one line on stderr naming the problem and what to do, exit code 2, the model never
# loaded (everything is checked first), nothing written (not even the output folder).
BAD_INPUTS = {
    "r_too_big": r"--r 9 is not valid for mixtral blocks with 8 experts and top-2 routing; valid values: 2..8",
    "r_below_top_k": r"--r 1 is not valid .* valid values: 2..8",
    "no_r": r"needs --r",
    "dense_model": r"LlamaForCausalLM .* has no MoE layer .*supported MoE families: .*mixtral",
    "missing_data": r"calibration file for --calib_set c4 not found: .*missing.json; download .*allenai/c4",
    "malformed_data": r"bad.json: line 1 is not valid JSON",
    "too_few_blocks": r"gives only \d+ blocks of 48 tokens .* asks for 100000",
    "empty_documents": r"all 128 sampled documents of .*empty.json are empty",
    "block_size_1": r"calibration blocks of 1 token \(--max_block_size 1, .*\) have no context; use at least 2",
    "self_block_size_1": r"calibration blocks of 1 token \(--max_block_size 1, .*\) have no context",  # only BOS
    "bad_device": r"--device cuda asked for but no CUDA GPU",
    "meta_device": r"--device meta is not a device this machine computes on; use cuda, cuda:N or cpu",
    "negative_seed": r"--seed must be in 0..4294967295, got -1",
    "huge_seed": r"--seed must be in 0..4294967295, got 4294967296",
    "no_flash_attn": r"--use_flash_attention_2 needs the flash_attn package, which is not installed",
    "model_missing": r"no such folder: .*/nope \(--model_path\)",
    "model_relative_missing": r"no such folder: \./nope/x \(--model_path\)",
    "model_empty_folder": r"no config.json in .*/empty: not a Hugging Face checkpoint folder",
    "model_is_file": r"--model_path .*/config.json is a file; give the checkpoint folder",
    "no_weights": r"no weights in .*/no-weights: expected model.safetensors",
    "truncated_weights": r"truncated/model.safetensors is truncated or corrupt \(\d+ bytes, its header describes "
                         r"\d+ bytes\): copy or download it again",
    "no_tokenizer": r"no tokenizer files in .*/no-tokenizer .*: copy them from the model it was made from",
    "mistyped_config": r"cannot read the model config .*/mistyped/config.json: .*'num_local_experts' expected int, "
                       r"got str \(value: 'eight'\)",
    "vocab_mismatch": r"the tokenizer gives token id \d+ but the model has 64 embeddings",
    "output_is_file": r"--output_path .*/out is a file, not a folder",
    "output_under_file": r"cannot create --output_path .*/file/out: .*/file is a file",
    "output_not_writable": r"cannot write into --output_path .*/locked: Permission denied",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_before_loading_and_nothing_written(case, tiny_mixtral, c4_path, tmp_path,
                                                                     tokenizer_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    model, r, data, n_blocks, device, extra = tiny_mixtral, ["--r", "6"], str(c4_path), 8, "cpu", []
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
    elif case == "empty_documents":
        data = str(tmp_path / "empty.json")
        (tmp_path / "empty.json").write_text('{"text": ""}\n' * 200)
    elif case in ("block_size_1", "self_block_size_1"):
        extra = ["--max_block_size", "1"]
    elif case == "bad_device":
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
        device = "cuda"
    elif case == "meta_device":
        device = "meta"
    elif case == "negative_seed":
        extra = ["--seed", "-1"]
    elif case == "huge_seed":
        extra = ["--seed", str(2**32)]
    elif case == "no_flash_attn":
        if importlib.util.find_spec("flash_attn") is not None:
            pytest.skip("flash_attn is installed")
        extra = ["--use_flash_attention_2"]
    elif case == "model_missing":
        model = tmp_path / "nope"
    elif case == "model_relative_missing":
        monkeypatch.chdir(tmp_path)
        model = "./nope/x"
    elif case == "model_empty_folder":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "model_is_file":
        model = tiny_mixtral / "config.json"
    elif case == "no_weights":
        model = _copy_model(tiny_mixtral, tmp_path / "no-weights", drop=["*.safetensors"])
    elif case == "truncated_weights":
        model = _copy_model(tiny_mixtral, tmp_path / "truncated")
        weights = model / "model.safetensors"
        os.truncate(weights, weights.stat().st_size - 1000)  # an interrupted download
    elif case == "no_tokenizer":
        model = _copy_model(tiny_mixtral, tmp_path / "no-tokenizer", drop=["tokenizer*"])
    elif case == "mistyped_config":
        model = _copy_model(tiny_mixtral, tmp_path / "mistyped", edit_config={"num_local_experts": "eight"})
    elif case == "vocab_mismatch":
        model = save_model(tiny_mixtral_config(vocab_size=64), tmp_path / "small-vocab", tokenizer_dir)
    elif case == "output_is_file":
        out.write_text("not a folder")
    elif case == "output_under_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"  # a real write attempt that fails (as root, too)
    elif case == "output_not_writable":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder anyway; test_reliability.py covers a read-only "
                        "file system")
        out = tmp_path / "locked"
        out.mkdir(mode=0o555)
    args = ["--method", "layerwise_pruning", *r, *common(model, data, out, n_blocks=n_blocks, device=device), *extra]
    if case == "self_block_size_1":  # sampling from the model would give blocks of only BOS
        args[args.index("c4")] = "self"
        del args[args.index("--calib_path"): args.index("--calib_path") + 2]

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(main, "load_model", no_load)
    capsys.readouterr()  # drop what building the inputs printed
    listing = lambda: sorted(p.name for p in out.iterdir()) if out.is_dir() else out.exists()  # noqa: E731
    before = listing()
    assert main.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("main.py: error: "), err  # no log line before it
    assert re.search(BAD_INPUTS[case], err[0]), err[0]
    assert listing() == before  # nothing written, no staging folder, no output folder made


def test_failure_during_save_keeps_finished_layers_and_the_rerun_finishes(tiny_mixtral, c4_path, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--method", "layerwise_pruning", "--r", "6", *common(tiny_mixtral, c4_path, out)]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    import model.checkpoint

    with monkeypatch.context() as m:
        m.setattr(model.checkpoint, "result_config", boom)  # after the weights are written
        with pytest.raises(RuntimeError, match="disk full"):
            main.main(args)
    (staging,) = out.iterdir()  # only the hidden staging folder: no half-written result
    assert staging.name.startswith(".tiny-mixtral_layerwise_pruning_r6_c4_8_") and staging.name.endswith(".partial")
    assert sorted(p.name for p in (staging / "layers").iterdir()) == ["0.json", "1.json"]
    assert not (staging / "result").exists()
    assert f"kept {staging} with the results of 2 finished layers (0, 1): run the same command again" in \
        capsys.readouterr().err

    assert main.main(args) == 0  # continues from the kept layers: no search, only the save
    result = only_result(out)
    assert json.loads((result / "pruning_info.json").read_text())["resumed_layers"] == [0, 1]


def test_runs_of_the_same_name_in_the_same_second_each_keep_their_result(tiny_mixtral, c4_path, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(main, "datetime", _Fixed)
    out = tmp_path / "out"
    args = ["--method", "layerwise_pruning", "--r", "6", *common(tiny_mixtral, c4_path, out)]
    assert main.main(args) == 0
    assert main.main(args) == 0  # the same command again
    assert main.main([*args, "--batch_size", "2"]) == 0  # a setting the name does not show
    name = "tiny-mixtral_layerwise_pruning_r6_c4_8_len48_float32_20260102-030405"
    assert sorted(p.name for p in out.iterdir()) == [name, f"{name}-2", f"{name}-3"]
    for d in out.iterdir():
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    batch_sizes = [json.loads((out / n / "pruning_info.json").read_text())["args"]["batch_size"]
                   for n in (name, f"{name}-2", f"{name}-3")]
    assert batch_sizes == [4, 4, 2]


def test_run_name_carries_the_settings_a_sweep_varies():
    base = ["--method", "progressive_pruning", "--r", "4", "--calib_set", "c4", "--model_path", "/m/Mixtral-8x7B"]
    assert main.run_name(main.parse_args(base)) == "Mixtral-8x7B_progressive_pruning_r4_c4_128"
    swept = main.parse_args([*base, "--max_block_size", "512", "--seed", "7", "--search", "beam", "--dtype",
                             "float32", "--n_blocks_for_stat", "32"])
    assert main.run_name(swept) == "Mixtral-8x7B_progressive_pruning_r4_c4_32_len512_seed7_beam_float32"
    skipping = main.parse_args(["--method", "dynamic_skipping", "--calib_set", "math", "--model_path", "x/y/",
                                "--search", "beam"])
    assert main.run_name(skipping) == "y_dynamic_skipping_math_128"  # --search does not apply to skipping


def test_pruning_a_skipping_checkpoint_drops_stale_betas(tiny_mixtral, c4_path, tmp_path):
    config = json.loads((tiny_mixtral / "config.json").read_text())
    config["betas"] = {"0": 0.4, "1": 0.4}
    (tiny_mixtral / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main.main(["--method", "layerwise_pruning", "--r", "6", *common(tiny_mixtral, c4_path, out)]) == 0
    result = only_result(out)
    assert "betas" not in json.loads((result / "config.json").read_text())
    assert json.loads((result / "pruning_info.json").read_text())["removed_stale_betas"] is True
