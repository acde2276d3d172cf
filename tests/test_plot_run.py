"""scripts/plot_run.py on real run folders written by main.py on a tiny model."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

import main
from scripts import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_main(method, model, c4_path, out, *extra):
    argv = ["--method", method, *extra, "--calib_set", "c4", "--calib_path", str(c4_path), "--model_path",
            str(model), "--output_path", str(out), "--max_block_size", "48", "--n_blocks_for_stat", "4",
            "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--dtype", "float32"]
    assert main.main(argv) == 0
    (result,) = list(out.iterdir())
    return result


def assert_png(path, min_bytes=8000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))  # a blank 1-axes figure alone is ~5 KB at this size
    img = matplotlib.image.imread(path)  # decodes
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("method,extra,expected", [
    ("layerwise_pruning", ["--r", "6"], ["experts.png", "losses.png"]),
    ("reap_pruning", ["--r", "5"], ["experts.png", "scores.png"]),
    ("dynamic_skipping", [], ["betas.png"]),
])
def test_writes_valid_pngs_beside_pruning_info(method, extra, expected, tiny_mixtral, c4_path, tmp_path, capsys):
    run = run_main(method, tiny_mixtral, c4_path, tmp_path / "out", *extra)
    capsys.readouterr()
    assert plot_run.main([str(run)]) == 0
    out = capsys.readouterr().out.split("\n")
    for name in expected:
        assert f"wrote {run / name}" in out
        assert_png(run / name)
    assert sorted(p.name for p in run.glob("*.png")) == sorted(expected)


def test_recorded_skip_rates_get_their_panel(tiny_mixtral, c4_path, tmp_path):
    """A skipping run whose layers carry a recorded skip rate gets a second panel: a wider figure."""
    run = run_main("dynamic_skipping", tiny_mixtral, c4_path, tmp_path / "out")
    plot_run.main([str(run)])
    width_without = matplotlib.image.imread(run / "betas.png").shape[1]
    info = json.loads((run / "pruning_info.json").read_text())
    for i, layer in enumerate(info["layers"].values()):
        layer["skip_rate"] = 0.4 + 0.1 * i
    (run / "pruning_info.json").write_text(json.dumps(info))
    assert plot_run.main([str(run)]) == 0
    assert_png(run / "betas.png")
    assert matplotlib.image.imread(run / "betas.png").shape[1] > 1.4 * width_without


def test_folder_without_pruning_info_is_one_line_error(tmp_path, capsys):
    assert plot_run.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no pruning_info.json" in err and err.startswith("error: ")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "pruning_info.json").write_text(json.dumps({"layers": {"0": {"something": 1}}}))
    assert plot_run.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither kept experts nor betas" in err
    assert not list(tmp_path.glob("*.png"))
