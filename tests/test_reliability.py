"""main.py as a real process: signals, a read-only file system, stale staging folders, and a clean stderr."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import main

from conftest import REPO, save_model, tiny_mixtral_config


def _args(model, c4_path, out, n_blocks=8, block=32):
    return ["--method", "layerwise_pruning", "--r", "6", "--calib_set", "c4", "--calib_path", str(c4_path),
            "--model_path", str(model), "--output_path", str(out), "--max_block_size", str(block),
            "--n_blocks_for_stat", str(n_blocks), "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--dtype", "float32"]


def _wait_for(predicate, proc, what, timeout=300.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _staging(out):
    found = [p for p in out.glob(".*.partial")] if out.is_dir() else []
    return found[0] if found else None


@pytest.fixture
def slow_model(tmp_path, tokenizer_dir):
    """Enough layers that a signal sent after the first one lands in the middle of the run."""
    return save_model(tiny_mixtral_config(layers=8), tmp_path / "tiny-mixtral", tokenizer_dir)


def test_sigterm_exits_143_and_keeps_the_finished_layers(slow_model, c4_path, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "main.py", *_args(slow_model, c4_path, out, n_blocks=16, block=64)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _staging(out) is not None and (_staging(out) / "layers" / "0.json").exists(), proc,
              "layer 0 was finished")
    proc.send_signal(signal.SIGSTOP)  # hold it mid-run while checking, then terminate
    staging = _staging(out)
    assert [p.name for p in out.iterdir()] == [staging.name]  # no result yet
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.rstrip().endswith("terminated (SIGTERM)"), err
    finished = sorted(int(p.stem) for p in (staging / "layers").glob("*.json"))
    assert finished and finished == list(range(len(finished))) and len(finished) < 8
    assert f"kept {staging} with the results of {len(finished)} finished layers" in err
    assert "run the same command again to continue" in err
    assert [p.name for p in out.iterdir()] == [staging.name] and not (staging / "result").exists()


def test_ctrl_c_before_any_finished_layer_exits_130_and_leaves_nothing(slow_model, c4_path, tmp_path):
    out = tmp_path / "new" / "out"  # made by the run, removed again
    proc = subprocess.Popen([sys.executable, "main.py", *_args(slow_model, c4_path, out, n_blocks=16, block=64)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _staging(out) is not None, proc, "the staging folder was made")
    proc.send_signal(signal.SIGSTOP)
    assert not (_staging(out) / "layers").exists()  # no finished layer: nothing worth keeping
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("interrupted (Ctrl-C)"), err
    assert not (tmp_path / "new").exists()


def test_read_only_file_system_is_one_line_before_loading(tiny_mixtral, c4_path, tmp_path):
    """A real read-only mount (a tmpfs mounted read-only in a private mount namespace)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (root or user namespaces) to mount a read-only file system")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = f'mount -t tmpfs -o ro tmpfs {ro} && exec "$@"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "main.py",
                           *_args(tiny_mixtral, c4_path, ro)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    # The whole stderr of the process: no log line, no warning, only the error.
    assert done.stderr.splitlines() == [f"main.py: error: cannot write into --output_path {ro}: Read-only file system"]


def test_bad_input_in_a_real_process_prints_only_the_error(tiny_mixtral, c4_path, tmp_path):
    """Found after reading and tokenizing the calibration file: still nothing but the error line on stderr."""
    args = _args(tiny_mixtral, c4_path, tmp_path / "out", n_blocks=100000)
    done = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "asks for 100000" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_stale_staging_folders_are_named_and_empty_ones_removed(tiny_mixtral, c4_path, tmp_path, capsys):
    out = tmp_path / "out"
    dead_empty = out / ".other_layerwise_pruning_r4_c4_8.0123456789ab.partial"
    dead_empty.mkdir(parents=True)
    (dead_empty / "lock").write_text("999999\n")  # no process holds its lock: its run is dead
    (dead_empty / "calib.pt").write_bytes(b"")
    unlocked = out / ".tiny-mixtral_layerwise_pruning_r6_c4_8_20260101-000000.partial"  # an older version's
    unlocked.mkdir()
    assert main.main(_args(tiny_mixtral, c4_path, out)) == 0
    err = capsys.readouterr().err
    assert f"removed {dead_empty}, the staging folder of a dead run that had finished no layer" in err
    assert not dead_empty.exists()
    assert f"{unlocked} looks like a staging folder but has no lock file" in err and unlocked.is_dir()
    (result,) = [p for p in out.iterdir() if p != unlocked]
    assert json.loads((result / "pruning_info.json").read_text())["args"]["r"] == 6
    assert "resumed_layers" not in json.loads((result / "pruning_info.json").read_text())
    assert os.listdir(result)  # published


def test_sigterm_during_a_log_line_is_not_swallowed(monkeypatch):
    """SIGTERM can land while tqdm's logging handler writes a line; that handler swallows every exception but
    KeyboardInterrupt and SystemExit (printing '--- Logging error ---' and running on), so Terminated must be
    one of those to stop the run (a race CI hit once)."""
    import logging

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from main import Terminated

    def write(*_a, **_k):
        raise Terminated()

    log = logging.getLogger("test_reliability.sigterm")
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler())
    with logging_redirect_tqdm(loggers=[log]):
        monkeypatch.setattr(tqdm, "write", write)
        with pytest.raises(Terminated):
            log.info("a line being written when the signal lands")
