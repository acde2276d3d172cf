"""A run killed (SIGKILL) after any layer, restarted with the same command, ends exactly as an uninterrupted run.

The kill comes from the runner's progress step (MOE_PRUNING_TEST_KILL_AFTER_LAYER), in a real
`python main.py` process; the uninterrupted and the resumed runs are the same command in this
process. Same machine, same kernels, same inputs: results compare exactly (decisions, losses,
betas, and the checkpoint's bytes).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest

import main
import method.pruning
import method.skip_calibration
from model.runner import KILL_AFTER_LAYER_ENV

from conftest import REPO, save_model, tiny_mixtral_config
from families import family_config

TIMING = ("wall_time_s", "timing", "peak_host_rss_gib", "peak_gpu_allocated_gib", "resumed_layers")


def _args(method, model, c4_path, out, dtype):
    r = ["--r", "6"] if method != "dynamic_skipping" else []
    return ["--method", method, *r, "--calib_set", "c4", "--calib_path", str(c4_path), "--model_path", str(model),
            "--output_path", str(out), "--max_block_size", "32", "--n_blocks_for_stat", "6", "--batch_size", "4",
            "--num_workers", "0", "--device", "cpu", "--dtype", dtype]


def _killed_run(args, after_layer: int) -> subprocess.CompletedProcess:
    env = {**os.environ, KILL_AFTER_LAYER_ENV: str(after_layer)}
    done = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done


def _result(out):
    (result,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    info = json.loads((result / "pruning_info.json").read_text())
    info["args"].pop("output_path")
    return result, info


@pytest.mark.parametrize("method_name,family,dtype,kill_after", [
    ("layerwise_pruning", "mixtral", "bfloat16", 1),
    ("progressive_pruning", "mixtral", "bfloat16", 2),
    ("progressive_pruning", "deepseek_v3", "float32", 2),  # a dense first layer; killed after the last layer
    ("dynamic_skipping", "mixtral", "bfloat16", 0),
])
def test_killed_run_resumes_to_the_uninterrupted_result(method_name, family, dtype, kill_after, tmp_path, c4_path,
                                                        tokenizer_dir, monkeypatch):
    config = tiny_mixtral_config(layers=4) if family == "mixtral" else family_config(family)
    model = save_model(config, tmp_path / f"tiny-{family}", tokenizer_dir)
    moe_layers = [i for i in range(config.num_hidden_layers) if family != "deepseek_v3" or i >= 1]
    finished = [i for i in moe_layers if i <= kill_after]

    args = _args(method_name, model, c4_path, tmp_path / "out", dtype)
    _killed_run(args, kill_after)
    (staging,) = (tmp_path / "out").iterdir()
    assert staging.name.startswith(".") and staging.name.endswith(".partial")
    assert sorted(int(p.stem) for p in (staging / "layers").glob("*.json")) == finished

    # Count the searches (pruning) or router-ratio computations (skipping) the resumed run does.
    searched = []
    if method_name == "dynamic_skipping":
        ratios = method.skip_calibration.weight_ratios
        monkeypatch.setattr(method.skip_calibration, "weight_ratios", lambda *a: searched.append(1) or ratios(*a))
    else:
        make = method.pruning.make_search
        monkeypatch.setattr(method.pruning, "make_search", lambda *a, **k: searched.append(1) or make(*a, **k))
    assert main.main(args) == 0
    n_batches = 2  # 6 blocks in batches of 4
    per_layer = n_batches if method_name == "dynamic_skipping" else 1
    assert len(searched) == per_layer * len([i for i in moe_layers if i > kill_after])  # finished layers: not again
    assert not staging.exists()
    resumed, resumed_info = _result(tmp_path / "out")
    assert resumed_info["resumed_layers"] == finished

    monkeypatch.undo()
    assert main.main(_args(method_name, model, c4_path, tmp_path / "uninterrupted", dtype)) == 0
    reference, reference_info = _result(tmp_path / "uninterrupted")
    assert {k: v for k, v in resumed_info.items() if k not in TIMING} == \
        {k: v for k, v in reference_info.items() if k not in TIMING}  # decisions, losses, betas: exactly
    assert sorted(map(int, reference_info["layers"])) == moe_layers
    for name in ("model.safetensors", "config.json"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes()


def test_stopped_runs_folder_is_locked_while_used_named_by_other_runs_and_resumed(tmp_path, c4_path, tokenizer_dir,
                                                                                 monkeypatch, capsys):
    model = save_model(tiny_mixtral_config(layers=3), tmp_path / "tiny-mixtral", tokenizer_dir)
    out = tmp_path / "out"
    args = _args("layerwise_pruning", model, c4_path, out, "float32")
    # A run that stops after layer 0 (here a failure in layer 1's search; a kill leaves the same folder).
    make, calls = method.pruning.make_search, []

    def fails_on_layer_1(*a, **k):
        calls.append(a)
        if len(calls) > 1:
            raise MemoryError("out of memory")
        return make(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(method.pruning, "make_search", fails_on_layer_1)
        with pytest.raises(MemoryError):
            main.main(args)
    (staging,) = out.iterdir()
    assert sorted(p.name for p in (staging / "layers").iterdir()) == ["0.json"]

    # While a run holds the folder's lock, the same command is refused at once and changes nothing.
    with open(staging / "lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        capsys.readouterr()
        assert main.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the same command is already running (pid " in err[0] and str(staging) in err[0]
        assert sorted(p.name for p in (staging / "layers").iterdir()) == ["0.json"]

    # Another command into the same folder names the dead run's folder and leaves it (it holds a finished layer).
    assert main.main([*args[:-2], "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert f"{staging} is the staging folder of a dead run with 1 finished layers: run its command again" in err
    assert staging.is_dir()

    assert main.main(args) == 0  # and the same command finishes it
    assert not staging.exists() and len(list(out.iterdir())) == 2
