"""eval/benchmark_speed.py on tiny models: exact token counts, the JSON report, random init, skipping."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_model, shared_path, tiny_mixtral_config

from eval.benchmark_speed import PRESETS, build_random_model, main, random_init_config

ALPACA = "prompts/alpaca_en_demo.json"
NEW = 7


@pytest.fixture(scope="module")
def alpaca():
    return shared_path(ALPACA)


@pytest.fixture
def tiny_config_json(tmp_path):
    tiny_mixtral_config().save_pretrained(tmp_path / "cfg")
    return tmp_path / "cfg" / "config.json"


def bench(tmp_path, *argv: str) -> dict:
    out = tmp_path / "speed.json"
    assert main([*argv, "--max_new_tokens", str(NEW), "--output", str(out)]) == 0
    return json.loads(out.read_text())


def check_report(r: dict, n_samples: int, seqs_per_sample: int = 1) -> None:
    assert r["num_samples"] == n_samples == len(r["samples"])
    for s in r["samples"]:
        assert s["generated_tokens"] == NEW * seqs_per_sample
        assert s["tokens_per_s"] > 0 and 0 < s["ttft_s"] < s["seconds"]
        assert s["decode_tokens"] == (NEW - 1) * seqs_per_sample
    assert r["total_tokens"] == NEW * seqs_per_sample * n_samples
    assert r["tokens_per_s"] == pytest.approx(r["total_tokens"] / r["total_seconds"])
    assert r["mean_ttft_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["load_seconds"] > 0 and r["num_parameters"] > 0
    assert (r["gpu_memory"] is None) == (r["environment"]["device"] == "cpu")
    for key in ("torch", "transformers", "device_name"):
        assert r["environment"][key]
    assert r["model"]["num_local_experts"] == 8 and r["experts_implementation"]
    assert r["args"]["max_new_tokens"] == NEW


def test_checkpoint(tmp_path, tiny_mixtral, alpaca):
    r = bench(tmp_path, "--model_name_or_path", str(tiny_mixtral), "--data_path", str(alpaca), "--num_samples", "2")
    check_report(r, 2)
    assert r["skipping"] is None and r["prompts"] == "alpaca prompt"


def test_beams_return_every_beam(tmp_path, tiny_mixtral, alpaca):
    r = bench(tmp_path, "--model_name_or_path", str(tiny_mixtral), "--data_path", str(alpaca), "--num_samples", "1",
              "--num_beams", "2", "--warmup", "0")
    check_report(r, 1, seqs_per_sample=2)


def test_checkpoint_with_betas_skips(tmp_path, tokenizer_dir, alpaca):
    config = tiny_mixtral_config()
    config.betas = {"0": 0.5, "1": 0.5}
    path = save_model(config, tmp_path / "skipping", tokenizer_dir)
    r = bench(tmp_path, "--model_name_or_path", str(path), "--data_path", str(alpaca), "--num_samples", "2")
    check_report(r, 2)
    skipping = r["skipping"]
    assert skipping["betas"] == {"0": 0.5, "1": 0.5} and 0 <= skipping["skip_rate"] <= 1
    assert set(skipping["layers"]) == {"0", "1"} and skipping["tokens"] > 0
    assert r["experts_implementation"].startswith("skip+")

    r = bench(tmp_path, "--model_name_or_path", str(path), "--data_path", str(alpaca), "--num_samples", "1",
              "--no_skipping")
    assert r["skipping"] is None and not r["experts_implementation"].startswith("skip+")


def test_random_init_with_tokenizer(tmp_path, tiny_config_json, tokenizer_dir, alpaca):
    r = bench(tmp_path, "--random_init", str(tiny_config_json), "--set", "num_hidden_layers=1",
              "--tokenizer_name_or_path", str(tokenizer_dir), "--data_path", str(alpaca), "--num_samples", "2")
    check_report(r, 2)
    assert r["model"]["num_hidden_layers"] == 1 and list(r["model"]["moe_layers"]) == ["0"]


def test_random_init_random_prompts_with_betas(tmp_path, tiny_config_json):
    r = bench(tmp_path, "--random_init", str(tiny_config_json), "--betas", "0.5", "--num_samples", "2",
              "--prompt_len", "10")
    check_report(r, 2)
    assert r["prompts"] == "random ids" and all(s["prompt_tokens"] == 10 for s in r["samples"])
    skipping = r["skipping"]
    assert 0 <= skipping["skip_rate"] <= 1 and skipping["betas"] == {"0": 0.5, "1": 0.5}
    # Statistics are reset after the warm-up: each sample routes its prompt and all new tokens but the last.
    assert all(layer["tokens"] == 2 * (10 + NEW - 1) for layer in skipping["layers"].values())


def test_random_init_matches_a_normally_built_model():
    config = tiny_mixtral_config()
    model = build_random_model(config, "cpu", torch.bfloat16, {})
    assert model.dtype == torch.bfloat16
    reference = type(model)(config)  # the usual CPU float32 construction
    rope = model.model.rotary_emb
    assert torch.equal(rope.inv_freq, reference.model.rotary_emb.inv_freq) and rope.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    experts = model.model.layers[0].mlp.experts.gate_up_proj.float()
    assert experts.std().item() == pytest.approx(config.initializer_range, rel=0.1)
    logits = model(torch.arange(1, 20)[None]).logits
    assert torch.isfinite(logits).all()


def test_presets_and_overrides():
    c = random_init_config("mixtral-8x7b", {})
    assert (c.hidden_size, c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok, c.intermediate_size,
            c.vocab_size) == (4096, 32, 8, 2, 14336, 32000)
    c = random_init_config("mixtral-8x22b", {"num_local_experts": 6, "num_hidden_layers": 2})
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size,
            c.max_position_embeddings) == (6144, 48, 8, 16384, 32768, 65536)
    assert (c.num_local_experts, c.num_hidden_layers) == (6, 2)
    assert set(PRESETS) >= {"mixtral-8x7b", "mixtral-8x22b"}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err
    return err


def test_missing_data_file(tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = main(["--model_name_or_path", "unused", "--data_path", str(tmp_path / "missing.json"), "--output", str(out)])
    assert rc == 2 and not out.exists()
    err = one_line_error(capsys)
    assert "missing.json" in err and "--data_path" in err and "yahma/alpaca-cleaned" in err


@pytest.mark.parametrize("argv, needle", [
    (["--random_init", "mixtral-8x7b", "--set", "num_experts_total=6"], "num_experts_total"),
    (["--set", "num_local_experts=6"], "--set"),
    (["--betas", "0.5", "--no_skipping"], "--betas"),
    (["--random_init", "mixtral-8x7b", "--betas", "fast"], "--betas"),
])
def test_bad_flags(tmp_path, capsys, argv, needle):
    out = tmp_path / "speed.json"
    assert main([*argv, "--output", str(out)]) == 2 and not out.exists()
    assert needle in one_line_error(capsys)
