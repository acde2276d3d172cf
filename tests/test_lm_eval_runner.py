"""eval/run_lm_eval.py: its accuracies equal ones computed here from the model's own log-likelihoods."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml

from conftest import REPO, save_model, shared_path, tiny_mixtral_config
from eval import run_lm_eval

LIMIT = 10
TOL = 1e-4  # slack for float32 rounding: lm-eval runs the very same token ids through the same model
STOCK_TASKS = Path(lm_eval.__file__).parent / "tasks"
# Each local task and the stock task whose prompt, target and metrics it keeps.
STOCK = {"arc_easy_local": "arc/arc_easy.yaml", "arc_challenge_local": "arc/arc_challenge.yaml",
         "boolq_local": "super_glue/boolq/default.yaml", "hellaswag_local": "hellaswag/hellaswag.yaml",
         "winogrande_local": "winogrande/default.yaml", "openbookqa_local": "openbookqa/openbookqa.yaml",
         "gsm8k_local": "gsm8k/gsm8k.yaml"}
# What a local task may change: its name, where its data comes from, and (HellaSwag) reading that data.
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
             "test_split", "fewshot_split", "process_docs"}


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    # The runner sets HF_DATASETS_OFFLINE with setdefault; keep it from leaking into other tests.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def arc_dir() -> Path:
    return shared_path("eval/arc_easy_test.jsonl").parent


def run(*argv: str) -> int:
    return run_lm_eval.main(["--device", "cpu", "--batch_size", "1", *argv])


# ---- the independent computation --------------------------------------------------------------
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """Sum of log-probs of the continuation's tokens, split off as lm-eval's HFLM does.

    lm-eval encodes context and context+continuation (both with the tokenizer's BOS) and takes
    the tokens of the whole past len(context tokens) as the continuation; the model sees the whole
    minus its last token. Returns the sum and the number of tokens the model ran on.
    """
    whole = tokenizer(context + continuation).input_ids
    n_context = len(tokenizer(context).input_ids)
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)
    targets = torch.tensor(whole[n_context:])
    return logprobs[n_context - 1:].gather(-1, targets[:, None]).sum().item(), len(whole) - 1


def arc_docs(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "arc_easy_test.jsonl").read_text().splitlines()[:LIMIT]]


def arc_loglikelihoods(model, tokenizer, docs: list[dict]) -> tuple[list[list[float]], int]:
    """Each doc's choice log-likelihoods under the stock ARC prompt, and the number of tokens the model ran on."""
    lls, tokens = [], 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scored = [continuation_logprob(model, tokenizer, context, " " + c) for c in doc["choices"]["text"]]
        lls.append([ll for ll, _ in scored])
        tokens += sum(n for _, n in scored)
    return lls, tokens


def accuracies(docs: list[dict], lls: list[list[float]]) -> tuple[float, float]:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per character of the choice)."""
    correct = correct_norm = 0
    for doc, ll in zip(docs, lls, strict=True):
        choices, gold = doc["choices"]["text"], doc["choices"]["label"].index(doc["answerKey"])
        correct += max(range(len(ll)), key=ll.__getitem__) == gold
        correct_norm += max(range(len(ll)), key=lambda i: ll[i] / len(choices[i])) == gold
    return correct / len(docs), correct_norm / len(docs)


def evaluate_arc(model_path: Path, data_dir: Path, out: Path, *flags: str) -> tuple[dict, list[list[float]]]:
    """Run the runner on arc_easy_local; its results.json and each doc's choice log-likelihoods."""
    assert run("--model_path", str(model_path), "--tasks", "arc_easy_local", "--data_dir", str(data_dir),
               "--limit", str(LIMIT), "--log_samples", "--output_path", str(out), *flags) == 0
    samples = [json.loads(line) for line in (out / "samples_arc_easy_local.jsonl").read_text().splitlines()]
    samples.sort(key=lambda r: r["doc_id"])
    return json.loads((out / "results.json").read_text()), [[ll for ll, _ in r["filtered_resps"]] for r in samples]


# ---- evaluation ---------------------------------------------------------------------------------
def test_arc_accuracy_equals_the_models_own_loglikelihoods(tiny_mixtral, arc_dir, tmp_path):
    from model import load_model

    results, runner_lls = evaluate_arc(tiny_mixtral, arc_dir, tmp_path / "out")
    model, tokenizer = load_model(str(tiny_mixtral), device="cpu")
    docs = arc_docs(arc_dir)
    lls, _ = arc_loglikelihoods(model, tokenizer, docs)
    assert runner_lls == [pytest.approx(ll, abs=TOL) for ll in lls]
    acc, acc_norm = accuracies(docs, lls)
    metrics = results["results"]["arc_easy_local"]
    assert metrics["acc,none"] == pytest.approx(acc)
    assert metrics["acc_norm,none"] == pytest.approx(acc_norm)
    assert results["n-samples"]["arc_easy_local"]["effective"] == LIMIT
    assert results["n-shot"]["arc_easy_local"] == 0
    assert "dynamic_skipping" not in results
    table = (tmp_path / "out" / "results.md").read_text()
    assert "arc_easy_local" in table and "acc_norm" in table and "±" in table


def test_skipping_checkpoint_is_evaluated_with_skipping(tokenizer_dir, arc_dir, tmp_path):
    from model import load_model

    path = save_model(tiny_mixtral_config(betas={"0": 0.5, "1": 0.5}), tmp_path / "skipping", tokenizer_dir)
    results, runner_lls = evaluate_arc(path, arc_dir, tmp_path / "out")
    model, tokenizer = load_model(str(path), device="cpu")
    assert model.dynamic_skipping is not None
    docs = arc_docs(arc_dir)
    lls, tokens = arc_loglikelihoods(model, tokenizer, docs)
    assert runner_lls == [pytest.approx(ll, abs=TOL) for ll in lls]
    # Skipping moves the scores by more than TOL, so the check above tells a skipping run from a dense one.
    model.dynamic_skipping.disable()
    dense_lls, _ = arc_loglikelihoods(model, tokenizer, docs)
    assert max(abs(a - b) for r, d in zip(runner_lls, dense_lls) for a, b in zip(r, d)) > 10 * TOL
    acc, acc_norm = accuracies(docs, lls)
    assert results["results"]["arc_easy_local"]["acc,none"] == pytest.approx(acc)
    assert results["results"]["arc_easy_local"]["acc_norm,none"] == pytest.approx(acc_norm)
    skipping = results["dynamic_skipping"]
    assert skipping["betas"] == {"0": 0.5, "1": 0.5}
    # Every token of every request went through both layers' skipping router hooks (batch size 1: no padding).
    assert skipping["tokens"] == 2 * tokens
    assert 0 < skipping["skip_rate"] < 1
    assert "Dynamic skipping on" in (tmp_path / "out" / "results.md").read_text()


def test_no_skipping_flag(tokenizer_dir, arc_dir, tmp_path):
    path = save_model(tiny_mixtral_config(betas={"0": 0.5, "1": 0.5}), tmp_path / "skipping", tokenizer_dir)
    out = tmp_path / "out"
    assert run("--model_path", str(path), "--tasks", "arc_easy_local", "--data_dir", str(arc_dir),
               "--limit", "2", "--no_skipping", "--output_path", str(out)) == 0
    assert "dynamic_skipping" not in json.loads((out / "results.json").read_text())


def test_include_path_task(tiny_mixtral, arc_dir, tmp_path):
    """A user's own task YAML under --include_path runs (here: ARC-Easy again, under another name)."""
    include = tmp_path / "my_tasks"
    include.mkdir()
    text = (run_lm_eval.TASKS_DIR / "arc_easy_local.yaml").read_text()
    (include / "my_arc.yaml").write_text(
        text.replace("task: arc_easy_local", "task: my_arc").replace(run_lm_eval.PLACEHOLDER, str(arc_dir)))
    out = tmp_path / "out"
    assert run("--model_path", str(tiny_mixtral), "--tasks", "my_arc", "--include_path", str(include),
               "--limit", "2", "--output_path", str(out)) == 0
    assert "my_arc" in json.loads((out / "results.json").read_text())["results"]


# ---- errors -------------------------------------------------------------------------------------
def test_unknown_task_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "run_lm_eval.py"), "--model_path", "unused",
                           "--tasks", "arc_easy,no_such_task", "--output_path", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown task(s) no_such_task:" in lines[0] and "arc_easy_local" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("how", ["flag", "env", "default"])
def test_missing_data_folder(how, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no_data"
    monkeypatch.delenv(run_lm_eval.DATA_ENV, raising=False)
    argv = ["--model_path", "unused", "--tasks", "arc_easy_local", "--output_path", str(tmp_path / "out")]
    if how == "flag":
        argv += ["--data_dir", str(missing)]
    elif how == "env":
        monkeypatch.setenv(run_lm_eval.DATA_ENV, str(missing))
    else:
        monkeypatch.setattr(run_lm_eval, "DEFAULT_DATA_DIR", missing)
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert "--data_dir" in err and run_lm_eval.DATA_ENV in err
    assert not (tmp_path / "out").exists()


def test_missing_data_file_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_test.jsonl").write_text("")
    assert run("--model_path", "unused", "--tasks", "gsm8k_local", "--data_dir", str(data),
               "--output_path", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(data / "gsm8k_train.jsonl") in err and "--data_dir" in err


def empty_arc_data(tmp_path) -> Path:
    """A data folder that passes the runner's file checks (the model or task check fails first)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "arc_easy_test.jsonl").write_text("")
    return data


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "no_model", "no_model: no such folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "empty has no config.json"),
])
def test_missing_model_path(tmp_path, capsys, make, needle):
    """A local path that is not a checkpoint fails at once (not "Repo id must be in the form ..." or hub retries)."""
    assert run("--model_path", str(make(tmp_path)), "--tasks", "arc_easy_local", "--data_dir",
               str(empty_arc_data(tmp_path)), "--output_path", str(tmp_path / "out")) == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file(tmp_path, capsys):
    """Found before the task index and the model load, not when the results are written."""
    out = tmp_path / "results"
    out.write_text("keep me")
    assert run("--model_path", str(tmp_path / "no_model"), "--tasks", "arc_easy_local", "--data_dir",
               str(empty_arc_data(tmp_path)), "--output_path", str(out)) == 2
    assert f"--output_path {out} is a file, not a folder" in one_line_error(capsys)
    assert out.read_text() == "keep me"


def test_output_path_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "sub" / "out"
    assert run("--model_path", str(tmp_path / "no_model"), "--tasks", "arc_easy_local", "--data_dir",
               str(empty_arc_data(tmp_path)), "--output_path", str(out)) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in one_line_error(capsys)


BROKEN_YAML = "task: broken\ndataset_path: json\n  output_type: [multiple_choice\n"


def test_task_yaml_that_does_not_parse_in_include_path(tmp_path, capsys):
    """lm-eval skips such a file silently and then calls its task unknown; the runner names the file and line."""
    include = tmp_path / "my_tasks"
    (include / "sub").mkdir(parents=True)
    (include / "sub" / "broken.yaml").write_text(BROKEN_YAML)
    assert run("--model_path", str(tmp_path / "no_model"), "--tasks", "broken", "--include_path", str(include),
               "--output_path", str(tmp_path / "out")) == 2
    err = one_line_error(capsys)
    assert f"task file {include / 'sub' / 'broken.yaml'} does not parse (line 3, column " in err
    assert not (tmp_path / "out").exists()


def test_task_yaml_that_does_not_parse_in_the_task_folder(tmp_path, capsys, monkeypatch):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for src in run_lm_eval.TASKS_DIR.iterdir():
        if src.suffix in (".yaml", ".py"):
            (tasks / src.name).write_text(src.read_text())
    (tasks / "boolq_local.yaml").write_text(BROKEN_YAML)
    monkeypatch.setattr(run_lm_eval, "TASKS_DIR", tasks)
    assert run("--model_path", str(tmp_path / "no_model"), "--tasks", "arc_easy_local", "--data_dir",
               str(empty_arc_data(tmp_path)), "--output_path", str(tmp_path / "out")) == 2
    assert f"task file {tasks / 'boolq_local.yaml'} does not parse (line 3, column " in one_line_error(capsys)


def test_task_yamls_with_tags_parse():
    """The check accepts lm-eval's own tags (`!function`): every stock task YAML passes it."""
    run_lm_eval.check_task_files([run_lm_eval.TASKS_DIR, STOCK_TASKS / "hellaswag", STOCK_TASKS / "gsm8k"])


# ---- the task files -----------------------------------------------------------------------------
def _load_task_yaml(path: Path) -> dict:
    """A task YAML with its includes merged; `!function x.y.f` becomes the text `!function y.f`, so that
    a stock helper named by its module path compares equal to the stock YAML's relative reference."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + ".".join(
        loader.construct_scalar(node).split(".")[-2:]))
    cfg = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (SafeLoader plus one tag)
    if "include" in cfg:
        cfg = {**_load_task_yaml(path.parent / cfg.pop("include")), **cfg}
    return cfg


@pytest.mark.parametrize("task", sorted(STOCK))
def test_local_task_keeps_the_stock_settings(task):
    local = _load_task_yaml(run_lm_eval.TASKS_DIR / f"{task}.yaml")
    stock = _load_task_yaml(STOCK_TASKS / STOCK[task])
    assert local["task"] == task  # the runner names local tasks by their file names
    assert local["dataset_path"] == "json"
    assert {k: v for k, v in local.items() if k not in DATA_KEYS} == {k: v for k, v in stock.items()
                                                                      if k not in DATA_KEYS}


def test_every_local_task_is_checked():
    assert set(run_lm_eval.local_tasks()) == set(STOCK)


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "run_lm_eval.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--model_path", "--tasks", "--output_path", "--data_dir", "--include_path", "--num_fewshot",
                 "--batch_size", "--limit", "--seed", "--device", "--dtype", "--no_skipping", "arc_easy_local"):
        assert flag in proc.stdout
