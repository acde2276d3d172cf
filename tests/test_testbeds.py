"""scripts/testbeds.py: the comparison's split into parts covers what issue #10 asks, once; merging the parts;
the pack; the carry checks. (The pipeline itself ran end to end at toy size: `prepare --tiny`, `run --tiny`.)"""

from __future__ import annotations

import hashlib
import json
import statistics
import tarfile

import pytest

from conftest import load_script as _load


tb = _load("testbeds")
cm = _load("compare_methods")


def carry(tmp_path, tiny=False):
    c = tmp_path / ".carry"
    (c / "testbeds").mkdir(parents=True)
    (c / "data").mkdir()
    (c / "testbeds" / "meta.json").write_text(json.dumps({"testbeds_prepare": {"tiny": tiny}}))
    files = {k: {"file": f"{k}.json"} for k in tb.DATA_FILES}
    (c / "data" / "MANIFEST.json").write_text(json.dumps({"files": files}))
    return c


@pytest.mark.parametrize("testbed", list(tb.TESTBEDS))
def test_parts_cover_the_comparison_once(tmp_path, testbed):
    """Every (method, r, calibration set) cell, 5 random seeds per r, the beam widths per r on C4, one skipping
    curve on top of the issue's r: the union of the parts' compare_methods.py runs, with the same settings."""
    c = carry(tmp_path)
    args = tb.parse_args(["compare", "--testbed", testbed, "--carry", str(c), "--root", str(tmp_path / "tb")])
    jobs = tb.compare_parts(args, testbed, c / "data", tmp_path / "out")
    cells, beams, skips, settings = [], [], [], set()
    for name, argv in jobs.items():
        assert argv[1] == "scripts/compare_methods.py"
        a = cm.parse_args(argv[2:])
        settings.add((a.model_path, a.n_blocks_for_stat, a.max_block_size, a.batch_size, a.seed, a.dtype, a.device,
                      a.wiki_docs, a.gsm8k_docs, a.eval_block_size, tuple(a.calib_file), a.search))
        for r in a.r:
            for m in a.methods:
                if m == "random":
                    cells += [("random", r, s) for s in range(a.seed, a.seed + a.random_seeds)]
                else:
                    cells += [(m, r, cs) for cs in a.calib_sets]
            beams += [(r, w, a.calib_sets[0]) for w in a.beam_widths]
        if a.skip_scales:
            skips.append((a.skip_on_r, tuple(a.skip_scales), a.calib_sets[0]))
    want = tb.TESTBEDS[testbed]
    expected = [(m, r, cs) for m in ("layerwise", "progressive", "frequency", "reap") for r in want["r"]
                for cs in ("c4", "math", "self")] + [("random", r, s) for r in want["r"] for s in range(42, 47)]
    # Each cell once, except the random seed-42 rows that the beam and skipping parts repeat (compare_methods.py
    # runs at least one method); the merge keeps one of each.
    repeats = sorted(set(x for x in cells if cells.count(x) > 1))
    assert set(cells) == set(expected)
    assert all(x[0] == "random" and x[2] == 42 for x in repeats)
    assert sorted(beams) == sorted((r, w, "c4") for r in want["r"] for w in want["beam_widths"])
    assert skips == [(want["skip_on_r"], (0.5, 0.75, 1, 1.25, 1.5, 2), "c4")]
    assert len(settings) == 1  # comparable rows: one calibration and evaluation setting
    (model_path, n_blocks, block, batch, seed, dtype, device, wiki_docs, gsm8k_docs, eval_block, _, search), = settings
    assert (n_blocks, block, batch, dtype, device, wiki_docs, gsm8k_docs, eval_block, search) == \
        (128, 512, 8, "bfloat16", "cuda", 200, 0, 512, "auto")


def row(method, r, calib, kept, wiki, seed=None):
    return {"method": method, "r": r, "calib_set": calib, "seed": seed, "kept_experts": {"0": kept},
            "wiki": {"perplexity": wiki}, "gsm8k": {"perplexity": wiki / 2}, "command": "python main.py ...",
            "total_loss": 1.0, "prune_seconds": 1.0}


def part(full, pruning, beam=(), skipping=()):
    return {"model_path": "testbeds/testbed-8x", "checkpoint_sha256": {"model.safetensors": "ab"}, "n_experts": 8,
            "top_k": 2, "n_moe_layers": 1, "eval_data": {}, "platform": {}, "settings": {"search": "auto"},
            "full": {"wiki": {"perplexity": full}, "gsm8k": {"perplexity": full / 2}}, "pruning": list(pruning),
            "random_summary": [{"stale": True}], "beam": list(beam), "skipping": list(skipping),
            "wall_time_s": 10.0, "command": "python scripts/compare_methods.py ..."}


SKIP = {"base": "full model", "no_skipping": {"wiki": {"perplexity": 30.0}, "gsm8k": {"perplexity": 15.0}},
        "curve": [{"scale": 1, "wiki": {"perplexity": 31.0, "skip_rate": 0.5}, "gsm8k": {"perplexity": 16.0, "skip_rate": 0.6}}]}


def test_merge_parts():
    randoms = [row("random", 6, None, [0, 1], w, seed=s) for s, w in zip((42, 43, 44), (50.0, 60.0, 80.0))]
    parts = {"prune-c4": part(30.0, [row("layerwise", 6, "c4", [1, 2], 35.0), *randoms]),
             "prune-math": part(30.0, [row("layerwise", 6, "math", [2, 3], 36.0)]),
             "skip": part(30.0 * (1 + 2e-7), [randoms[0]], skipping=[SKIP])}
    status = {name: {"rc": 0} for name in parts} | {"prune-self": {"rc": -9, "killed_at_deadline": True}}
    merged = tb.merge_parts(parts, status)
    assert [(x["method"], x["calib_set"], x["seed"]) for x in merged["pruning"]] == \
        [("layerwise", "c4", None), ("random", None, 42), ("random", None, 43), ("random", None, 44),
         ("layerwise", "math", None)]
    (summary,) = merged["random_summary"]  # recomputed over the merged rows, not the parts' own
    assert summary["seeds"] == [42, 43, 44] and summary["wiki"]["mean"] == pytest.approx(statistics.fmean([50, 60, 80]))
    assert summary["wiki"]["std"] == pytest.approx(statistics.stdev([50, 60, 80])) and summary["wiki"]["min"] == 50
    assert merged["repeated_rows_agree"] and merged["missing_parts"] == ["prune-self"]
    assert merged["full_model_max_rel_diff"] == pytest.approx(2e-7, rel=1e-3)
    assert merged["skipping"] == [SKIP]
    assert "63.33 ± 15.28 (50.00–80.00)" in cm.markdown(merged)  # compare_methods.py's table of the merge

    parts["skip"]["pruning"] = [row("random", 6, None, [4, 5], 50.0, seed=42)]  # same seed, other experts
    assert not tb.merge_parts(parts, status)["repeated_rows_agree"]


def test_pack_leaves_the_weights_out_and_lists_them(tmp_path):
    root = tmp_path / "testbeds"
    (root / "testbed-8x").mkdir(parents=True)
    weights = bytes(range(256)) * 100
    (root / "testbed-8x" / "model.safetensors").write_bytes(weights)
    (root / "testbed-8x" / "README.md").write_text("card")
    (root / "logs").mkdir()
    (root / "logs" / "train_testbed-8x.log").write_text("step 1")
    args = tb.parse_args(["pack", "--root", str(root), "--carry", str(carry(tmp_path)), "--out", str(tmp_path / "out")])
    target = tb.pack(args)
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("testbeds/MANIFEST.json"))
    assert names == {"testbeds/testbed-8x/README.md", "testbeds/logs/train_testbed-8x.log", "testbeds/MANIFEST.json",
                     "testbeds/prepared/testbeds_meta.json", "testbeds/prepared/data_MANIFEST.json"}
    assert manifest["files"]["testbed-8x/model.safetensors"] == {"bytes": len(weights),
                                                                 "sha256": hashlib.sha256(weights).hexdigest()}


def test_prepared_data_must_match_tiny(tmp_path, capsys):
    c = carry(tmp_path, tiny=True)
    rc = tb.main(["train", "--carry", str(c), "--root", str(tmp_path / "tb"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "was prepared with --tiny" in err
    rc = tb.main(["compare", "--tiny", "--testbed", "testbed-8x", "--carry", str(c), "--root", str(tmp_path / "tb")])
    err = capsys.readouterr().err
    assert rc == 2 and "has no model.safetensors" in err


def test_dense_line_says_when_the_twins_did_not_train_alike():
    merged = {"full": {"wiki": {"perplexity": 30.0}, "gsm8k": {"perplexity": 9.0}},
              "dense_baseline": {"model_path": "testbeds/dense-8x", "model_class": "MistralForCausalLM", "params": 10,
                                 "wiki": {"perplexity": 33.0}, "gsm8k": {"perplexity": 10.0},
                                 "training": {"moe": {"steps": 400, "tokens_seen": 400 * 32768},
                                              "dense": {"steps": 600, "tokens_seen": 600 * 32768}}}}
    line = tb.dense_markdown(merged)
    assert "Wikipedia perplexity 33.00 (MoE 30.00)" in line and "Not trained the same way" in line
    merged["dense_baseline"]["training"]["moe"] = merged["dense_baseline"]["training"]["dense"]
    assert "Not trained" not in tb.dense_markdown(merged)
