"""scripts/compare_methods.py end to end on the demo model at toy settings (CPU, float32)."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import main
from conftest import C4, REPO, shared_path
from data import read_texts
from eval.perplexity import token_blocks
from scripts import compare_methods

DEMO = str(REPO / "demo" / "tiny-moe")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def toy_argv(tmp_path, c4, wiki, gsm8k, *extra):
    return ["--model_path", DEMO, "--r", "6", "--calib_sets", "c4", "--calib_file", f"c4={c4}", "--random_seeds", "2",
            "--max_block_size", "64", "--n_blocks_for_stat", "4", "--batch_size", "4", "--dtype", "float32",
            "--device", "cpu", "--wiki", str(wiki), "--wiki_docs", "2", "--gsm8k", str(gsm8k), "--gsm8k_docs", "10",
            "--eval_block_size", "64", "--eval_batch_size", "32", "--output", str(tmp_path / "res.json"), "--markdown", str(tmp_path / "res.md"),
            "--fig_dir", str(tmp_path / "figs"), *extra]


@torch.no_grad()
def hf_perplexity(path, texts, block_size=64):
    """Reference: the library's own loss (labels = inputs) on the evaluator's blocks, all blocks at once."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = token_blocks(texts, AutoTokenizer.from_pretrained(path), block_size)
    return math.exp(model(input_ids=blocks, labels=blocks).loss.item())


def test_compare_end_to_end_on_demo_model(tmp_path, capsys):
    c4, wiki, gsm8k = (shared_path(p) for p in (C4, "corpus/wiki_heldout.jsonl.xz", "eval/gsm8k_test.jsonl"))
    argv = toy_argv(tmp_path, c4, wiki, gsm8k, "--beam_widths", "1", "--skip_scales", "1", "2",
                    "--skip_on_r", "6")
    assert compare_methods.main(argv) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    texts = {"wiki": read_texts(wiki)[:2], "gsm8k": read_texts(gsm8k, field="answer")[:10]}

    # Full model: the library's own loss on the same blocks. Same float32 model, different batch
    # composition and reduction order: 1e-5 relative covers float32 summation differences.
    for k in ("wiki", "gsm8k"):
        assert res["full"][k]["perplexity"] == pytest.approx(hf_perplexity(DEMO, texts[k]), rel=1e-5)
    assert res["checkpoint_sha256"].keys() == {"model.safetensors"} and res["n_experts"] == 8

    rows = res["pruning"]
    assert [(x["method"], x["calib_set"], x.get("seed")) for x in rows] == [
        ("layerwise", "c4", None), ("progressive", "c4", None), ("random", None, 42), ("random", None, 43),
        ("frequency", "c4", None), ("reap", "c4", None)]
    for x in rows:
        assert x["r"] == 6 and all(len(v) == 6 for v in x["kept_experts"].values()) and len(x["kept_experts"]) == 4
    rand = [x for x in rows if x["method"] == "random"]
    assert rand[0]["kept_experts"] != rand[1]["kept_experts"]
    (summary,) = res["random_summary"]
    assert summary["wiki"]["mean"] == pytest.approx((rand[0]["wiki"]["perplexity"] + rand[1]["wiki"]["perplexity"]) / 2)
    assert summary["gsm8k"]["min"] == min(x["gsm8k"]["perplexity"] for x in rand)

    # Traceability: the recorded main.py command rebuilds the REAP checkpoint, and plain transformers
    # scores it as the table says.
    reap = next(x for x in rows if x["method"] == "reap")
    cmd = shlex.split(reap["command"])
    assert cmd[:2] == ["python", "main.py"]
    assert main.main(cmd[2:] + ["--output_path", str(tmp_path / "rebuilt")]) == 0
    (ckpt,) = list((tmp_path / "rebuilt").iterdir())
    info = json.loads((ckpt / "pruning_info.json").read_text())
    assert {k: v["kept_experts"] for k, v in info["layers"].items()} == reap["kept_experts"]
    for k in ("wiki", "gsm8k"):
        assert reap[k]["perplexity"] == pytest.approx(hf_perplexity(ckpt, texts[k]), rel=1e-5)

    # Beam search cannot beat the exhaustive search's per-layer optimum on the summed loss.
    (beam,) = res["beam"]
    exhaustive = next(x for x in rows if x["method"] == "layerwise")
    assert beam["beam_width"] == 1 and beam["total_loss"] >= exhaustive["total_loss"] * (1 - 1e-12)

    # Skipping: larger betas skip more; the pruned curve starts from the pruned model's perplexity.
    full_curve, pruned_curve = res["skipping"]
    assert full_curve["base"] == "full model" and pruned_curve["base"] == "layerwise r=6, c4"
    assert pruned_curve["no_skipping"]["wiki"] == exhaustive["wiki"]
    for s in res["skipping"]:
        for k in ("wiki", "gsm8k"):
            rates = [p[k]["skip_rate"] for p in s["curve"]]
            assert [p["scale"] for p in s["curve"]] == [1, 2] and 0 < rates[0] < rates[1] < 1

    md = (tmp_path / "res.md").read_text()
    assert "| method | calibration | r=6 Wikipedia | r=6 GSM8K |" in md
    assert f"{res['full']['wiki']['perplexity']:.2f}" in md and "| random | none (2 seeds) |" in md
    assert "beam, width 1" in md and "1x (median, the paper's)" in md
    for name in ("ppl_vs_kept.png", "skip_curve.png"):
        data = (tmp_path / "figs" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20000
    assert not list(tmp_path.rglob(".*partial*"))


@pytest.mark.parametrize("extra,match", [
    (["--r", "1"], "--r 1 is not valid"),
    (["--wiki", "/nonexistent/wiki.jsonl"], "evaluation file /nonexistent/wiki.jsonl not found"),
    (["--calib_file", "c4=/nonexistent/c4.json"], "calibration file for --calib_set c4 not found"),
    (["--skip_on_r", "6"], "give --skip_scales too"),
])
def test_bad_input_one_line_error_nothing_written(extra, match, tmp_path, capsys):
    c4, wiki, gsm8k = (shared_path(p) for p in (C4, "corpus/wiki_heldout.jsonl.xz", "eval/gsm8k_test.jsonl"))
    assert compare_methods.main(toy_argv(tmp_path, c4, wiki, gsm8k, *extra)) == 2
    # transformers' weight-loading progress bar also goes to stderr; the script's own output is one line.
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("compare_methods.py: error: ") and match in err[0], err
    assert list(tmp_path.iterdir()) == []
