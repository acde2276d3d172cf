"""eval/benchmark_speed.py on tiny models: exact token counts, the JSON report, random init, skipping."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from conftest import save_model, shared_path, tiny_mixtral_config

from eval.benchmark_speed import PRESETS, alpaca_prompts, build_random_model, main, random_init_config

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


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_batches_and_engines(tmp_path, tiny_mixtral, alpaca, engine):
    """--batch_size 2: prompts of different lengths decoded together (left padding), exactly NEW tokens each."""
    r = bench(tmp_path, "--model_name_or_path", str(tiny_mixtral), "--data_path", str(alpaca), "--num_samples", "5",
              "--batch_size", "2", "--engine", engine, "--experts_implementation", "fused")
    assert r["engine"] == engine and r["batch_size"] == 2 and r["num_batches"] == 2 == len(r["samples"])
    assert r["num_samples"] == 4  # 5 prompts in batches of 2: the last, incomplete batch is left out
    for s in r["samples"]:
        assert s["batch_size"] == 2 and s["generated_tokens"] == 2 * NEW and s["decode_tokens"] == 2 * (NEW - 1)
    assert r["total_tokens"] == 4 * NEW
    # per decode step: the decode seconds over the (NEW - 1) steps of each of the 2 batches
    assert r["time_per_step_ms"] == pytest.approx(1000 * sum(s["decode_seconds"] for s in r["samples"]) / (2 * (NEW - 1)))


def test_graph_engine_needs_a_gpu(tmp_path, tiny_mixtral, alpaca, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = tmp_path / "x.json"
    assert main(["--model_name_or_path", str(tiny_mixtral), "--data_path", str(alpaca), "--engine", "graph",
                 "--output", str(out)]) == 2
    assert "--engine graph captures CUDA graphs" in capsys.readouterr().err and not out.exists()


def test_beams_return_every_beam(tmp_path, tiny_mixtral, alpaca):
    r = bench(tmp_path, "--model_name_or_path", str(tiny_mixtral), "--data_path", str(alpaca), "--num_samples", "1",
              "--num_beams", "2", "--warmup", "0")
    check_report(r, 1, seqs_per_sample=2)


@torch.no_grad()
def reference_skip_counts(path, prompts, beta: float) -> dict[str, dict]:
    """Per MoE layer: tokens routed and 2nd experts skipped in greedy generation (EOS banned, NEW tokens) by
    plain transformers with the paper's rule applied by hand in a forward hook on each Mixtral MoE block:
    softmax router, top-2, skip the 2nd expert when w2 < beta * w1, the 1st then gets weight 1."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    counts = {str(l): {"tokens": 0, "skipped": 0} for l in range(len(model.model.layers))}

    def skipping_moe(layer):
        def hook(block, args, _output):
            x = args[0]
            h = x.reshape(-1, x.shape[-1])
            w, i = torch.softmax(F.linear(h, block.gate.weight).float(), dim=-1).topk(2, dim=-1)
            skip = w[:, 1] < beta * w[:, 0]  # the renormalised weights have the same ratio
            w = torch.where(skip[:, None], torch.tensor([1.0, 0.0]), w / w.sum(dim=-1, keepdim=True))
            counts[layer]["tokens"] += skip.numel()
            counts[layer]["skipped"] += int(skip.sum())
            return block.experts(h, i, w).reshape(x.shape)
        return hook

    hooks = [layer.mlp.register_forward_hook(skipping_moe(str(l))) for l, layer in enumerate(model.model.layers)]
    try:
        for ids in prompts:
            model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False,
                           max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=2, pad_token_id=2)
    finally:
        for h in hooks:
            h.remove()
    return counts


def test_checkpoint_with_betas_skips(tmp_path, tokenizer_dir, alpaca):
    config = tiny_mixtral_config()
    config.betas = {"0": 0.5, "1": 0.5}
    path = save_model(config, tmp_path / "skipping", tokenizer_dir)
    r = bench(tmp_path, "--model_name_or_path", str(path), "--data_path", str(alpaca), "--num_samples", "2")
    check_report(r, 2)
    skipping = r["skipping"]
    assert skipping["betas"] == {"0": 0.5, "1": 0.5}
    assert r["experts_implementation"].startswith("skip+")

    # Reference: the same prompts (the report's sample, seed 0) generated by plain transformers with the rule
    # applied by hand. Counts are decisions: exact.
    args = argparse.Namespace(seed=0, num_samples=2, max_new_tokens=NEW, prompt_with_output=False)
    prompts, _ = alpaca_prompts(alpaca, AutoTokenizer.from_pretrained(path), args)
    assert [s["prompt_tokens"] for s in r["samples"]] == [len(p) for p in prompts]
    expected = reference_skip_counts(path, prompts, 0.5)
    for layer, c in expected.items():
        assert c["tokens"] == sum(len(p) + NEW - 1 for p in prompts)  # each prompt, then all new tokens but the last
        assert 0 < c["skipped"] < c["tokens"]  # the rule decides both ways here: the counts tell
        assert skipping["layers"][layer] == {**c, "skip_rate": c["skipped"] / c["tokens"]}, layer
    tokens = sum(c["tokens"] for c in expected.values())
    skipped = sum(c["skipped"] for c in expected.values())
    assert (skipping["tokens"], skipping["skipped"]) == (tokens, skipped)
    assert skipping["skip_rate"] == pytest.approx(skipped / tokens)

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
    # A --set value of another type than the config entry's.
    (["--random_init", "mixtral-8x7b", "--set", "num_local_experts=abc"],
     '--set num_local_experts="abc": mixtral num_local_experts expects an integer (now 8)'),
    (["--random_init", "mixtral-8x7b", "--set", "num_local_experts=6.5"], "num_local_experts expects an integer"),
    (["--random_init", "mixtral-8x7b", "--set", "num_local_experts=true"], "num_local_experts expects an integer"),
    (["--random_init", "mixtral-8x7b", "--set", "rms_norm_eps=small"], "rms_norm_eps expects a number"),
    (["--random_init", "mixtral-8x7b", "--set", "hidden_act=5"], "hidden_act expects a string"),
    (["--random_init", "mixtral-8x7b", "--set", "tie_word_embeddings=1"], "tie_word_embeddings expects true or false"),
    # --betas: one finite threshold >= 0, or a dict of them.
    (["--random_init", "mixtral-8x7b", "--betas", "-0.5"], "--betas -0.5: expected a finite number >= 0"),
    (["--random_init", "mixtral-8x7b", "--betas", "NaN"], "--betas NaN: expected a finite number >= 0"),
    (["--random_init", "mixtral-8x7b", "--betas", "Infinity"], "--betas Infinity: expected a finite number >= 0"),
    (["--random_init", "mixtral-8x7b", "--betas", "true"], "--betas true: expected a finite number >= 0"),
    (["--random_init", "mixtral-8x7b", "--betas", '"0.5"'], '--betas "0.5": expected a finite number >= 0'),
    (["--random_init", "mixtral-8x7b", "--betas", "[0.5]"], "--betas [0.5]: expected a finite number >= 0"),
    (["--random_init", "mixtral-8x7b", "--betas", '{"0": -1}'], "--betas: `betas` entry of layer 0 is -1: expected"),
    (["--random_init", "mixtral-8x7b", "--betas", '{"0": 0.5, "1": NaN}'], "`betas` entry of layer 1 is NaN"),
])
def test_bad_flags(tmp_path, capsys, argv, needle):
    out = tmp_path / "speed.json"
    assert main([*argv, "--output", str(out)]) == 2 and not out.exists()
    assert needle in one_line_error(capsys)


def test_betas_dict_is_matched_to_the_layers(tmp_path, tiny_config_json, capsys):
    """The form of a --betas dict is checked before the model exists, its layers once it does."""
    out = tmp_path / "speed.json"
    assert main(["--random_init", str(tiny_config_json), "--betas", '{"0": 0.5}', "--output", str(out)]) == 2
    assert "--betas: `betas` has no entry for MoE layer 1 (has 0)" in one_line_error(capsys)
    assert not out.exists()


def test_set_values_of_the_right_type():
    c = random_init_config("mixtral-8x7b", {"num_local_experts": 6, "rms_norm_eps": 1, "router_jitter_noise": 0.1,
                                            "hidden_act": "gelu", "tie_word_embeddings": True, "sliding_window": 64})
    assert (c.num_local_experts, c.rms_norm_eps, c.router_jitter_noise, c.hidden_act, c.tie_word_embeddings,
            c.sliding_window) == (6, 1.0, 0.1, "gelu", True, 64)
    assert isinstance(c.rms_norm_eps, float)  # an integer for a float entry: the config class wants a float


def test_set_value_refused_by_the_config_class(tmp_path, capsys):
    """An entry that is null (no type to compare with) is left to the config class's own validator."""
    out = tmp_path / "speed.json"
    assert main(["--random_init", "mixtral-8x7b", "--set", "sliding_window=wide", "--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert "--set gives an invalid mixtral config: Validation error for field 'sliding_window'" in err


@pytest.mark.parametrize("content, needle", [
    ("{not json", "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2"),
    ('{"instruction": "a", "input": "", "output": "b"}', 'holds {"instruction"'),
    ("[]", "holds [], not a non-empty JSON array"),
    ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "output": "b"}]', "example 1 is"),
    ('[{"instruction": "a", "input": "", "output": 3}]', "example 0 is"),
    ('["a prompt"]', 'example 0 is "a prompt"'),
])
def test_malformed_data_file(tmp_path, capsys, content, needle):
    """Found before the model is looked at (the model path does not even exist)."""
    data = tmp_path / "alpaca.json"
    data.write_text(content)
    out = tmp_path / "speed.json"
    assert main(["--model_name_or_path", str(tmp_path / "no_model"), "--data_path", str(data),
                 "--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"Alpaca data file {data}" in err and needle in err
    assert 'expected a JSON array of {"instruction", "input", "output"} strings' in err
    assert not out.exists()


@pytest.mark.parametrize("where, needle", [
    ("", "is a folder; give a file name"),
    ("file/speed.json", "file is a file, not a folder"),
    ("file/deeper/speed.json", "file is a file, not a folder"),
])
def test_unwritable_output_is_found_before_the_model_loads(tmp_path, capsys, alpaca, where, needle):
    """The model path does not exist: the --output error shows the output is checked first."""
    (tmp_path / "file").write_text("")
    out = tmp_path / where
    assert main(["--model_name_or_path", str(tmp_path / "no_model"), "--data_path", str(alpaca),
                 "--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"benchmark_speed.py: error: --output {out}") and needle in err


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "no_model", "no_model: no such folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "empty has no config.json"),
])
def test_missing_model_folder(tmp_path, capsys, alpaca, make, needle):
    out = tmp_path / "speed.json"
    assert main(["--model_name_or_path", str(make(tmp_path)), "--data_path", str(alpaca), "--output", str(out)]) == 2
    assert needle in one_line_error(capsys) and not out.exists()


def test_compile_flag(tmp_path, tiny_mixtral, alpaca, capsys):
    """--compile: the static engine with torch.compile'd norms/routers/attention reports the same token counts;
    unknown parts and the hf engine are refused in one line before anything loads."""
    r = bench(tmp_path, "--model_name_or_path", str(tiny_mixtral), "--data_path", str(alpaca), "--num_samples", "2",
              "--engine", "static", "--compile", "norm,router", "--experts_implementation", "fused")
    check_report(r, 2)
    assert r["compile"] == "norm,router"
    capsys.readouterr()
    for argv, msg in ((["--compile", "norm,mlp", "--engine", "static"], "unknown part(s) mlp"),
                      (["--compile", "norm"], "add --engine graph")):
        out = tmp_path / "refused.json"
        assert main(["--model_name_or_path", str(tiny_mixtral), "--data_path", str(alpaca), *argv,
                     "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and not out.exists()
