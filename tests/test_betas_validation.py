"""`betas` are validated in one place (DynamicSkipping's constructor, run by load_model on a meta-device
skeleton before any weight is read): every bad value is one line that names the layer and the value, and
every eval script reports it on stderr with exit code 2."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import save_model, shared_path, tiny_mixtral_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval import benchmark_speed, perplexity, run_lm_eval
from model import DynamicSkipping, load_model
from model.loading import check_checkpoint
from model.dynamic_skipping import BetasError, check_betas

NAN, INF = float("nan"), float("inf")

# (entry of layer 1 in a top-2 model, how config.json spells it): each is refused for layer 1.
BAD_TOP2 = [("0.5", '"0.5"'), (True, "true"), (NAN, "NaN"), (INF, "Infinity"), (-INF, "-Infinity"),
            (-0.5, "-0.5"), (None, "null"), ([0.5], "[0.5]"), ({"a": 0.5}, '{"a": 0.5}')]
# Entries of layer 1 in a top-3 model (a list of 2 thresholds): a number, the wrong length, a bad element.
BAD_TOP3 = [(0.5, "0.5"), ([0.5], "[0.5]"), ([0.5, 0.4, 0.3], "[0.5, 0.4, 0.3]"), ([0.5, "0.4"], '[0.5, "0.4"]'),
            ([0.5, NAN], "[0.5, NaN]"), ([0.5, -0.1], "[0.5, -0.1]"), ([0.5, None], "[0.5, null]"),
            ([False, 0.5], "[false, 0.5]"), ([], "[]")]
# The whole `betas` value: not a dict of layers.
BAD_WHOLE = [(0.5, "0.5"), ("0.5", '"0.5"'), ([0.5, 0.5], "[0.5, 0.5]"), (None, "null"), ({}, "{}"), (True, "true")]


def meta_model(top_k: int = 2, layers: int = 2):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_mixtral_config(top_k=top_k, layers=layers))


def entry_error(value) -> str:
    return f"`betas` entry of layer 1 is {json.dumps(value)}"


# ---- the rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value, spelled", BAD_TOP2)
def test_bad_top2_entry_names_layer_and_value(value, spelled):
    with pytest.raises(BetasError) as e:
        DynamicSkipping(meta_model(), {"0": 0.5, "1": value})
    assert str(e.value) == (f"`betas` entry of layer 1 is {spelled}: layer 1 routes to top-2, so it needs one "
                            "threshold: a finite number >= 0")


@pytest.mark.parametrize("value, spelled", BAD_TOP3)
def test_bad_top3_entry_names_layer_and_value(value, spelled):
    with pytest.raises(BetasError) as e:
        DynamicSkipping(meta_model(top_k=3), {"0": [0.5, 0.5], "1": value})
    assert str(e.value) == (f"`betas` entry of layer 1 is {spelled}: layer 1 routes to top-3, so it needs 2 "
                            "thresholds (ranks 2..3): a list of 2 finite numbers >= 0")


@pytest.mark.parametrize("value, spelled", BAD_WHOLE)
def test_betas_that_are_not_a_dict_of_layers(value, spelled):
    model = meta_model()
    model.config.betas = value  # as read from config.json ("betas": null is there, but not a dict of layers)
    with pytest.raises(BetasError, match=rf"^`betas` is {re.escape(spelled)}: expected a JSON object"):
        DynamicSkipping(model)


@pytest.mark.parametrize("betas, message", [
    ({"0": 0.5}, "`betas` has no entry for MoE layer 1 (has 0)"),
    ({"0": 0.5, "1": 0.5, "2": 0.5}, "`betas` has an entry for layer 2, which is not a MoE layer (MoE layers: 0, 1)"),
    ({"0": 0.5, "layer1": 0.5}, '`betas` key "layer1" is not a layer index'),
    ({"0": 0.5, "-1": 0.5}, '`betas` key "-1" is not a layer index'),
])
def test_betas_must_match_the_moe_layers(betas, message):
    with pytest.raises(BetasError) as e:
        DynamicSkipping(meta_model(), betas)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("top_k, betas, expected", [
    (2, {"0": 0, "1": 0.5}, {0: [0.0], 1: [0.5]}),  # 0: never skip (an int is a number)
    (2, {"0": 1.5, "1": 1}, {0: [1.5], 1: [1.0]}),  # above 1: always skip
    (3, {"0": [0.6, 0.4], "1": [0, 2]}, {0: [0.6, 0.4], 1: [0.0, 2.0]}),
])
def test_valid_betas(top_k, betas, expected):
    skipping = DynamicSkipping(meta_model(top_k=top_k), betas)
    assert set(skipping.betas) == set(expected)
    for i, b in skipping.betas.items():  # the same float -> float32 conversion on both sides: exact
        assert b.dtype == torch.float32 and torch.equal(b, torch.tensor(expected[i]))
    assert not skipping.enabled  # the constructor only checks: no hook until enable()


def test_form_check_without_a_model():
    """With no model yet (benchmark_speed's --betas dict) only the form is checked; layers are matched later."""
    assert check_betas({"3": 0.5, "7": [0.1, 0.2]}) == {3: [0.5], 7: [0.1, 0.2]}
    with pytest.raises(BetasError, match=r"^`betas` entry of layer 7 is NaN: expected a finite number"):
        check_betas({"3": 0.5, "7": NAN})
    with pytest.raises(BetasError, match=r"^`betas` entry of layer 7 is \[\]: expected"):
        check_betas({"3": 0.5, "7": []})


# ---- the loader: before any weight is read ------------------------------------------------------
def config_only_checkpoint(path, betas, top_k: int = 2, tokenizer_dir=None):
    """A checkpoint folder with config.json (and a tokenizer) but NO weights: an error naming the betas shows
    they were checked before transformers looked for model.safetensors."""
    tiny_mixtral_config(top_k=top_k).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["betas"] = betas
    (path / "config.json").write_text(json.dumps(config))  # json writes NaN/Infinity as Python's json reads them
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("value, spelled", BAD_TOP2)
def test_load_model_refuses_bad_config_betas_before_the_weights(tmp_path, value, spelled):
    path = config_only_checkpoint(tmp_path / "ckpt", {"0": 0.5, "1": value})
    config = re.escape(str(path / "config.json"))
    with pytest.raises(BetasError, match=rf"^{config}: `betas` entry of layer 1 is {re.escape(spelled)}: "):
        load_model(path, device="cpu")
    check_checkpoint(path, skipping=False)  # --no_skipping ignores the betas


@pytest.mark.parametrize("value, spelled", BAD_WHOLE)
def test_load_model_refuses_config_betas_that_are_not_a_dict(tmp_path, value, spelled):
    path = config_only_checkpoint(tmp_path / "ckpt", value)
    config = re.escape(str(path / "config.json"))
    with pytest.raises(BetasError, match=rf"^{config}: `betas` is {re.escape(spelled)}: "):
        load_model(path, device="cpu")


def test_load_model_with_good_betas_skips(tmp_path, tokenizer_dir):
    """Integers are numbers: a config written by hand with 0 and 1 loads, and skipping is on."""
    path = save_model(tiny_mixtral_config(betas={"0": 0, "1": 1}), tmp_path / "ckpt", tokenizer_dir)
    model, _ = load_model(path, device="cpu")
    assert model.dynamic_skipping.enabled
    assert {i: b.tolist() for i, b in model.dynamic_skipping.betas.items()} == {0: [0.0], 1: [1.0]}


# ---- every eval script: one line on stderr, exit code 2 ---------------------------------------
@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} has some words in it."}) + "\n" for i in range(20)))
    return path


def run_script(script: str, ckpt, tmp_path, texts_file) -> int:
    if script == "perplexity":
        return perplexity.main(["--model_path", str(ckpt), "--data", str(texts_file), "--block_size", "8",
                                "--device", "cpu", "--output", str(tmp_path / "out.json")])
    if script == "benchmark_speed":
        alpaca = shared_path("prompts/alpaca_en_demo.json")
        return benchmark_speed.main(["--model_name_or_path", str(ckpt), "--data_path", str(alpaca), "--device", "cpu",
                                     "--output", str(tmp_path / "out.json")])
    data = tmp_path / "eval_data"
    data.mkdir(exist_ok=True)
    (data / "arc_easy_test.jsonl").write_text("")
    return run_lm_eval.main(["--model_path", str(ckpt), "--tasks", "arc_easy_local", "--data_dir", str(data),
                             "--device", "cpu", "--output_path", str(tmp_path / "out.json")])


BAD_FOR_SCRIPTS = [({"0": 0.5, "1": v}, f"`betas` entry of layer 1 is {s}: ") for v, s in BAD_TOP2] + \
                  [(v, f"`betas` is {s}: ") for v, s in BAD_WHOLE]


@pytest.mark.parametrize("script", ["perplexity", "benchmark_speed", "run_lm_eval"])
@pytest.mark.parametrize("betas, needle", BAD_FOR_SCRIPTS, ids=[json.dumps(b) for b, _ in BAD_FOR_SCRIPTS])
def test_every_eval_script_reports_bad_betas(script, betas, needle, tmp_path, tokenizer_dir, texts_file, capsys,
                                             monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # run_lm_eval sets it with setdefault: keep it in this test
    ckpt = config_only_checkpoint(tmp_path / "ckpt", betas, tokenizer_dir=tokenizer_dir)
    assert run_script(script, ckpt, tmp_path, texts_file) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{ckpt / 'config.json'}: {needle}" in err, err
    assert not (tmp_path / "out.json").exists()


def test_nan_is_read_from_config_json_as_nan(tmp_path):
    """The NaN case above is the real one: transformers' config reader turns the JSON token NaN into a float nan."""
    path = config_only_checkpoint(tmp_path / "ckpt", {"0": NAN, "1": 0.5})
    assert "NaN" in (path / "config.json").read_text()
    assert math.isnan(check_checkpoint(path, skipping=False).betas["0"])


def test_check_checkpoint_reads_where_from_pretrained_would(tmp_path):
    """from_pretrained's location arguments (here subfolder) reach the early check too."""
    config_only_checkpoint(tmp_path / "outer" / "sub", {"0": 0.5, "1": -1})
    with pytest.raises(BetasError, match=re.escape(f"{tmp_path / 'outer' / 'sub' / 'config.json'}: `betas` entry")):
        check_checkpoint(tmp_path / "outer", subfolder="sub")
    assert check_checkpoint(tmp_path / "outer", skipping=False, subfolder="sub").betas == {"0": 0.5, "1": -1}
