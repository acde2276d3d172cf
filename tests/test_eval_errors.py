"""Bad input to the eval scripts: one line on stderr, exit code 2, found before the model loads, nothing written.

perplexity.py's cases are here (benchmark_speed.py's and run_lm_eval.py's sit with their other tests);
the end of the file runs each script as a real process, with its INFO logging on, to show that the error
line is the only thing on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, shared_path, tiny_mixtral_config
from transformers import AutoTokenizer

from cli import UsageError, check_output_dir, check_output_file
from eval import perplexity
from model.loading import CheckpointError, check_model_path, looks_local


@pytest.fixture
def no_weights(tmp_path, tokenizer_dir):
    """A checkpoint folder with config.json and a tokenizer but no weights: any error other than "cannot load"
    shows the check ran before the weights were looked for."""
    path = tmp_path / "no_weights"
    tiny_mixtral_config().save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} has some words."}) + "\n" for i in range(5)))
    return path


def ppl(tmp_path, capsys, *argv: str) -> str:
    """Run perplexity.py; it must fail with exit code 2, one stderr line and no output file. Returns the line."""
    out = tmp_path / "ppl.json"
    assert perplexity.main([*argv, "--device", "cpu", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("perplexity.py: error: ")
    assert not out.exists()
    return err


# ---- perplexity.py ------------------------------------------------------------------------------
def test_too_few_tokens_for_one_block(tmp_path, capsys, no_weights, tokenizer_dir):
    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"text": "two words"}) + "\n")
    n = len(AutoTokenizer.from_pretrained(tokenizer_dir)("two words")["input_ids"]) + 1  # + EOS
    err = ppl(tmp_path, capsys, "--model_path", str(no_weights), "--data", str(data), "--block_size", "64")
    assert f"--data {data} (1 document): the text gives {n} tokens, fewer than one block of 64" in err
    assert err.endswith("lower --block_size")


def test_too_few_tokens_suggests_every_document(tmp_path, capsys, no_weights, texts):
    err = ppl(tmp_path, capsys, "--model_path", str(no_weights), "--data", str(texts), "--max_docs", "2",
              "--block_size", "4096")
    assert err.endswith("lower --block_size or pass --max_docs 0 to read every document")


@pytest.mark.parametrize("flag, value, needle", [
    ("--block_size", "0", "--block_size must be at least 1, got 0"),
    ("--batch_size", "0", "--batch_size must be at least 1, got 0"),
    ("--batch_size", "-3", "--batch_size must be at least 1, got -3"),
    ("--max_docs", "-1", "--max_docs must be >= 0 (0: every document), got -1"),
    ("--dtype", "float8", "--dtype 'float8' is not one of bfloat16, float16, float32, auto"),
])
def test_bad_numbers(tmp_path, capsys, texts, flag, value, needle):
    """Checked first: the model path does not even exist."""
    err = ppl(tmp_path, capsys, "--model_path", str(tmp_path / "no_model"), "--data", str(texts), flag, value)
    assert err == f"perplexity.py: error: {needle}"


@pytest.mark.parametrize("model, needle", [
    ("no_model", "model path {tmp}/no_model: no such folder"),
    ("empty", "model folder {tmp}/empty has no config.json: not a checkpoint folder"),
    ("file", "model path {tmp}/file is a file: give the checkpoint's folder"),
])
def test_missing_model(tmp_path, capsys, texts, model, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    err = ppl(tmp_path, capsys, "--model_path", str(tmp_path / model), "--data", str(texts))
    assert err == "perplexity.py: error: " + needle.format(tmp=tmp_path)


def test_missing_relative_model_path_does_not_go_to_the_hub(tmp_path, capsys, texts, monkeypatch):
    """"output/run" with a local folder "output" is a typo of a local path, not a hub id: no hub retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    err = ppl(tmp_path, capsys, "--model_path", "output/run", "--data", str(texts))
    assert err == "perplexity.py: error: model path output/run: no such folder"


@pytest.mark.parametrize("content, field, needle", [
    ("not json\n", "text", "line 1 is not valid JSON (Expecting value)"),
    ('{"text": "a"}\n{"text": \n', "text", "line 2 is not valid JSON"),
    ('[{"text": "a"}, {"body": "b"}]', "text", "record 2 has no string 'text' field"),
    ('{"text": "a"}\n', "body", "record 1 has no string 'body' field"),
    ('{"text": 5}\n', "text", "record 1 has no string 'text' field"),
    ("", "text", "holds no documents"),
])
def test_malformed_data_file(tmp_path, capsys, content, field, needle):
    """Read before the model is looked at (the model path does not exist)."""
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    err = ppl(tmp_path, capsys, "--model_path", str(tmp_path / "no_model"), "--data", str(data), "--field", field)
    assert f"{data}" in err and needle in err


def test_missing_data_file(tmp_path, capsys):
    err = ppl(tmp_path, capsys, "--model_path", str(tmp_path / "no_model"), "--data", str(tmp_path / "none.jsonl"))
    assert err == f"perplexity.py: error: --data {tmp_path / 'none.jsonl'}: no such file"


@pytest.mark.parametrize("where, needle", [("", "is a folder; give a file name"),
                                           ("file/ppl.json", "file is a file, not a folder")])
def test_bad_output_is_found_first(tmp_path, capsys, where, needle):
    (tmp_path / "file").write_text("")
    out = tmp_path / where
    assert perplexity.main(["--model_path", str(tmp_path / "no_model"), "--data", str(tmp_path / "none.jsonl"),
                            "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"perplexity.py: error: --output {out}") and needle in err
    assert (tmp_path / "file").read_text() == ""


# ---- the shared pieces --------------------------------------------------------------------------
@pytest.mark.parametrize("path, local", [
    ("mistralai/Mixtral-8x7B-v0.1", False), ("gpt2", False), ("/abs/model", True), ("./model", True),
    ("../model", True), ("~/model", True), ("a/b/c", True), ("a b", True), ("tests/no_model", True),
])
def test_looks_local(path, local, monkeypatch):
    monkeypatch.chdir(REPO)  # "tests" is a local folder there; "mistralai" is not
    assert looks_local(path) is local


def test_a_hub_id_is_left_to_transformers():
    check_model_path("mistralai/Mixtral-8x7B-v0.1")  # no error: the hub (or its cache) decides
    with pytest.raises(CheckpointError, match="no such folder"):
        check_model_path("/no/such/model")


def test_output_checks(tmp_path):
    (tmp_path / "file").write_text("")
    check_output_file(str(tmp_path / "new" / "deeper" / "out.json"), "--output")  # creatable: fine
    check_output_dir(str(tmp_path / "new" / "deeper"), "--output_path")
    check_output_file(str(tmp_path / "file"), "--output")  # an existing file is overwritten
    with pytest.raises(UsageError, match="is a folder"):
        check_output_file(str(tmp_path), "--output")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output_dir(str(tmp_path / "file"), "--output_path")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output_dir(str(tmp_path / "file" / "x"), "--output_path")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_output_in_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="is not writable"):
            check_output_file(str(ro / "out.json"), "--output")
        with pytest.raises(UsageError, match="is not writable"):
            check_output_dir(str(ro / "sub"), "--output_path")
    finally:
        ro.chmod(0o755)


# ---- real processes: the error line is all there is on stderr ------------------------------------
def bad_betas_checkpoint(path, tokenizer_dir):
    tiny_mixtral_config().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["betas"] = {"0": 0.5, "1": -0.5}
    (path / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def script_stderr(script: str, *argv: str, cwd) -> str:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "eval" / script), *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("script", ["perplexity.py", "benchmark_speed.py", "run_lm_eval.py"])
def test_error_line_is_all_of_stderr(script, tmp_path, tokenizer_dir, texts):
    """The latest bad input each script finds before loading weights (the checkpoint's betas, after its data,
    tokenizer or task checks) still comes without a log line before it."""
    ckpt = bad_betas_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    out = tmp_path / "out"
    if script == "perplexity.py":
        argv = ["--model_path", str(ckpt), "--data", str(texts), "--block_size", "8", "--output", str(out)]
    elif script == "benchmark_speed.py":
        argv = ["--model_name_or_path", str(ckpt), "--data_path", str(shared_path("prompts/alpaca_en_demo.json")),
                "--output", str(out)]
    else:
        argv = ["--model_path", str(ckpt), "--tasks", "arc_easy_local", "--output_path", str(out),
                "--data_dir", str(shared_path("eval/arc_easy_test.jsonl").parent)]
    err = script_stderr(script, *argv, "--device", "cpu", cwd=tmp_path)
    assert err == (f"{script}: error: {ckpt / 'config.json'}: `betas` entry of layer 1 is -0.5: layer 1 routes to "
                   "top-2, so it needs one threshold: a finite number >= 0\n")
    assert not out.exists()
