"""A run folder that explains itself: model card, end-of-run summary, clean logs, original expert numbering."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import data.self_calib
import main
from model.card import FOLDER, add_original_numbering, read_expert_map

from conftest import save_model, tiny_mixtral_config

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) \[")


def _run(method, model, c4_path, out, *extra, dtype="float32"):
    args = ["--method", method, *extra, "--calib_set", "c4", "--calib_path", str(c4_path), "--model_path",
            str(model), "--output_path", str(out), "--max_block_size", "48", "--n_blocks_for_stat", "8",
            "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--dtype", dtype]
    assert main.main(args) == 0
    (result,) = out.iterdir()
    return result, json.loads((result / "pruning_info.json").read_text())


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def _table_rows(stdout: str, header_start: str) -> list[list[str]]:
    """The summary's rows: the lines after its header, columns split at two or more spaces."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("saved to"):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_pruning_run_card_summary_and_logs(tiny_mixtral, c4_path, tmp_path, capsys):
    result, info = _run("layerwise_pruning", tiny_mixtral, c4_path, tmp_path / "out", "--r", "6")
    captured = capsys.readouterr()

    # Summary on stdout: per layer the dropped experts, the best loss and the margin to the next best
    # candidate, which the test takes from the losses of all 28 drop sets itself.
    rows = _table_rows(captured.out, "layer")
    assert [r[0] for r in rows] == ["0", "1"]
    for layer, dropped, best, margin in rows:
        losses = sorted(info["layers"][layer]["loss"].values())
        assert len(losses) == 28
        assert dropped == ", ".join(map(str, info["layers"][layer]["dropped_experts"]))
        assert float(best) == pytest.approx(losses[0], rel=1e-5)  # printed with 6 significant digits
        assert float(margin) == pytest.approx(losses[1] - losses[0], rel=1e-3)  # 4 significant digits
        assert losses[1] - losses[0] > 0

    # Log lines never glue onto a progress bar: each starts a line (tqdm.write clears the bar first).
    err = captured.err
    assert "layerwise pruning:" in err and "layer 0: drop" in err  # a bar, and a log line written while it ran
    starts = [m.start() for m in LOG_LINE.finditer(err)]
    assert starts and all(i == 0 or err[i - 1] in "\r\n" for i in starts), err

    # The model card: Hugging Face front matter, what was done, how to load it.
    card = (result / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == str(tiny_mixtral) and meta["library_name"] == "transformers"
    assert meta["tags"] == ["moe", "expert-pruning"]
    hub = ModelCard.load(result / "README.md")  # the hub library reads it
    assert hub.data.base_model == str(tiny_mixtral) and hub.data.tags == ["moe", "expert-pruning"]
    assert "`layerwise_pruning`" in card and "r = 6 of 8" in card
    assert "`--calib_set c4`" in card and "8 sequences of 48 tokens, seed 42" in card
    assert "exhaustive; 28 candidate drop sets per MoE layer, all of them scored" in card
    for layer, dropped, best, margin in rows:
        assert f"| {layer} | {dropped} | {best} | {margin} |" in card
    assert "It has no `betas`" in card and "vLLM" in card

    # The card's loading code loads this folder as the pruned model.
    (snippet,) = _python_blocks(card)
    scope = {}
    exec(snippet.replace(FOLDER, str(result)), scope)
    assert scope["model"].config.num_local_experts == 6
    assert scope["model"].model.layers[1].mlp.experts.gate_up_proj.shape[0] == 6
    assert scope["tokenizer"]("a test").input_ids[0] == scope["tokenizer"].bos_token_id


def test_skipping_run_card_and_summary(tiny_mixtral, c4_path, tmp_path, capsys):
    """The betas and skip rates themselves are checked against the router in
    test_cli.py::test_dynamic_skipping_betas_are_router_medians; here, that the summary and the card show them."""
    result, info = _run("dynamic_skipping", tiny_mixtral, c4_path, tmp_path / "out")
    out = capsys.readouterr().out

    rows = _table_rows(out, "layer")
    assert [r[0] for r in rows] == ["0", "1"]
    for layer, beta, rate in rows:
        assert float(rate) == pytest.approx(info["layers"][layer]["calib_skip_rate"], abs=5e-4)  # 3 decimals
        assert float(beta) == pytest.approx(info["layers"][layer]["beta_median"], abs=5e-5)  # 4 decimals

    card = (result / "README.md").read_text()
    assert _front_matter(card)["tags"] == ["moe", "dynamic-skipping"]
    assert "ignored by plain transformers, the stock lm-eval (`--model hf`) and vLLM" in " ".join(card.split())
    for layer, beta, rate in rows:
        assert f"| {layer} | {beta} | {rate} |" in card
    (snippet,) = _python_blocks(card)
    assert "from model import load_model" in snippet
    scope = {}
    exec(snippet.replace(FOLDER, str(result)), scope)
    assert scope["model"].dynamic_skipping is not None and scope["model"].dynamic_skipping.enabled


def test_pruning_a_pruned_model_numbers_experts_as_the_original(tmp_path, c4_path, tokenizer_dir, capsys):
    """8 -> 6 experts, dynamic skipping on that, then 6 -> 4: the last run's experts in the original numbering
    equal the composition of the two pruning decisions, and its weights are those original experts."""
    original = save_model(tiny_mixtral_config(), tmp_path / "tiny-mixtral", tokenizer_dir)
    six, first = _run("layerwise_pruning", original, c4_path, tmp_path / "a", "--r", "6", dtype="bfloat16")
    skip, skipping = _run("dynamic_skipping", six, c4_path, tmp_path / "b", dtype="bfloat16")
    four, second = _run("layerwise_pruning", skip, c4_path, tmp_path / "c", "--r", "4", dtype="bfloat16")
    out = capsys.readouterr().out

    for layer in ("0", "1"):
        kept6, kept4 = first["layers"][layer]["kept_experts"], second["layers"][layer]["kept_experts"]
        dropped4 = second["layers"][layer]["dropped_experts"]
        assert first["layers"][layer]["kept_experts_original"] == kept6  # the first input is the original
        assert skipping["expert_map"][layer] == kept6  # skipping keeps the experts: carries the map on
        by_hand = [kept6[i] for i in kept4]
        assert second["layers"][layer]["kept_experts_original"] == by_hand
        assert second["layers"][layer]["dropped_experts_original"] == [kept6[i] for i in dropped4]
        assert second["expert_map"][layer] == by_hand
        assert sorted(by_hand + second["layers"][layer]["dropped_experts_original"]
                      + first["layers"][layer]["dropped_experts"]) == list(range(8))
        assert read_expert_map(four)[layer] == by_hand  # what a fourth run would compose with

    # The weights say the same: expert i of the final model is expert expert_map[i] of the original.
    before, after = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16) for p in (original, four))
    for layer in (0, 1):
        experts = before.model.layers[layer].mlp.experts, after.model.layers[layer].mlp.experts
        index = torch.tensor(second["expert_map"][str(layer)])
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(experts[1], name), getattr(experts[0], name)[index])  # a copy: exact
        assert torch.equal(after.model.layers[layer].mlp.gate.weight, before.model.layers[layer].mlp.gate.weight[index])

    # The summary and the card show both numberings for a re-pruned model.
    rows = _table_rows(out.split("saved to")[-2], "layer")
    for layer, dropped, dropped_original, *_ in rows:
        assert dropped_original == ", ".join(map(str, second["layers"][layer]["dropped_experts_original"]))
    assert "| layer | dropped experts | dropped (original numbering) |" in (four / "README.md").read_text()


def test_expert_map_of_an_older_run_and_of_a_broken_file(tmp_path, caplog):
    old = tmp_path / "old"
    old.mkdir()
    (old / "pruning_info.json").write_text(json.dumps({"layers": {"0": {"kept_experts": [1, 2, 5]},
                                                                  "1": {"kept_experts": [0, 3, 4]}}}))
    assert read_expert_map(old) == {"0": [1, 2, 5], "1": [0, 3, 4]}  # before expert maps: its kept experts
    assert read_expert_map(tmp_path) is None  # no pruning_info.json: an original model
    (old / "pruning_info.json").write_text('{"expert_map": {"0": [1, 1]}}')
    assert read_expert_map(old) is None
    assert "ignoring" in caplog.text and "repeated or negative" in caplog.text


def test_original_numbering_by_hand(caplog):
    def record():
        return {"layers": {"3": {"kept_experts": [0, 2], "dropped_experts": [1]}}}

    composed = record()
    add_original_numbering(composed, {"3": [4, 6, 7]}, {"3": 2})  # the input held original experts 4, 6, 7
    assert composed["layers"]["3"]["kept_experts_original"] == [4, 7]
    assert composed["layers"]["3"]["dropped_experts_original"] == [6]
    assert composed["expert_map"] == {"3": [4, 7]}

    stale = record()  # a map of 4 experts for an input of 3: not this checkpoint's, so not used
    add_original_numbering(stale, {"3": [4, 5, 6, 7]}, {"3": 2})
    assert stale["expert_map"] == {"3": [0, 2]} and "does not match its MoE layers" in caplog.text

    skipping = {"layers": {"3": {"beta_median": 0.3}}}  # keeps its 3 experts: carries the map on
    add_original_numbering(skipping, {"3": [4, 6, 7]}, {"3": 3})
    assert skipping["expert_map"] == {"3": [4, 6, 7]}


def test_self_calibration_bar_counts_sequences(tiny_mixtral, monkeypatch):
    """5 sequences in batches of 2: the bar's total is 5 and it moves by the sequences each batch made."""
    bars = []

    class Recorded(tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.steps = []
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)
            return super().update(n)

    monkeypatch.setattr(data.self_calib, "tqdm", Recorded)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_mixtral)
    blocks = data.self_calib.sample_from_model(model, tok, 6, 5, seed=0, batch_size=2)
    assert blocks.shape == (5, 6)
    (bar,) = bars
    assert bar.total == 5 and bar.steps == [2, 2, 1] and bar.n == 5 and bar.unit == "seq"


def test_every_method_has_a_model_card_entry():
    """model_card runs at the very end of a run: a registered method without a card entry would fail every run."""
    from method import METHODS
    from model import card

    assert set(card.METHODS) == set(METHODS)
