"""lm-eval with dynamic skipping: the `moe-skip` model type through lm-eval's own CLI (in one process and
data-parallel), eval/run_lm_eval.py, and the task files `python -m eval.tasks` writes. Accuracies,
log-likelihoods and skip counts are compared with ones computed here from the model itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml

from conftest import REPO, save_model, shared_path, tiny_mixtral_config
from eval import run_lm_eval
from eval import tasks as bundled
from eval.tasks import __main__ as write_tasks

LIMIT = 10
TOL = 1e-4  # slack for float32 rounding: lm-eval runs the very same token ids through the same model
BETAS = {"0": 0.5, "1": 0.5}
N_LAYERS = 2  # tiny_mixtral_config's MoE layers: each token is routed (and counted) once per layer
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


@pytest.fixture(scope="module")
def arc_dir() -> Path:
    return shared_path("eval/arc_easy_test.jsonl").parent


@pytest.fixture
def written_tasks(tmp_path, arc_dir) -> Path:
    """The bundled tasks with their data folder filled in, as `python -m eval.tasks --write DIR` writes them."""
    out = tmp_path / "moe_tasks"
    assert write_tasks.main(["--data_dir", str(arc_dir), "--write", str(out)]) == 0
    return out


def run(*argv: str) -> int:
    return run_lm_eval.main(["--device", "cpu", "--batch_size", "1", *argv])


def stock_cli(monkeypatch, *argv: str) -> None:
    """lm-eval's own console entry point (`lm_eval ...`), called in this process."""
    from lm_eval.__main__ import cli_evaluate

    monkeypatch.setattr(sys, "argv", ["lm_eval", "--device", "cpu", "--batch_size", "1", *argv])
    cli_evaluate()


def arc_flags(out: Path) -> list[str]:
    return ["--tasks", "arc_easy_local", "--limit", str(LIMIT), "--log_samples", "--output_path", str(out)]


def read_outputs(out: Path) -> tuple[dict, list[list[float]]]:
    """lm-eval's results file under out/<model>/ and each arc_easy_local doc's choice log-likelihoods."""
    (results,) = out.glob("*/results_*.json")
    (samples,) = out.glob("*/samples_arc_easy_local_*.jsonl")
    records = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    # lm-eval writes each response as text: [["-12.5", "False"], ...]
    return json.loads(results.read_text()), [[float(ll) for ll, _ in r["filtered_resps"]] for r in records]


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


@pytest.fixture(scope="module")
def skipping_ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    return save_model(tiny_mixtral_config(betas=BETAS), tmp_path_factory.mktemp("ckpt") / "skipping", tokenizer_dir)


@pytest.fixture(scope="module")
def skipping_reference(skipping_ckpt, arc_dir) -> dict:
    """The skipping checkpoint's choice log-likelihoods (skipping on and off), accuracies, and the tokens and
    skipped expert slots of those forward passes, computed here one (context, choice) pair at a time."""
    from model import load_model

    model, tokenizer = load_model(str(skipping_ckpt), device="cpu")
    docs = arc_docs(arc_dir)
    lls, tokens = arc_loglikelihoods(model, tokenizer, docs)
    stats = model.dynamic_skipping.stats()
    model.dynamic_skipping.disable()
    dense, _ = arc_loglikelihoods(model, tokenizer, docs)
    # Skipping moves the scores by more than TOL, so matching `lls` tells a skipping run from a dense one.
    assert max(abs(a - b) for r, d in zip(lls, dense) for a, b in zip(r, d)) > 10 * TOL
    assert stats["tokens"] == N_LAYERS * tokens and 0 < stats["skipped"] < stats["tokens"]
    return {"lls": lls, "dense_lls": dense, "acc": accuracies(docs, lls), "dense_acc": accuracies(docs, dense),
            "tokens": N_LAYERS * tokens, "skipped": stats["skipped"]}


def assert_arc(results: dict, lls: list[list[float]], expected_lls: list[list[float]], acc: tuple[float, float]):
    assert lls == [pytest.approx(ll, abs=TOL) for ll in expected_lls]
    metrics = results["results"]["arc_easy_local"]
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == pytest.approx(acc)
    assert results["n-samples"]["arc_easy_local"]["effective"] == LIMIT
    assert results["n-shot"]["arc_easy_local"] == 0


def assert_skip_counts(report: dict, ref: dict, processes: int = 1):
    assert report["enabled"] is True and report["betas"] == BETAS
    # Every token of every request went through both layers' skipping router hooks (batch size 1: no padding),
    # on whichever process ran it.
    assert (report["tokens"], report["skipped"]) == (ref["tokens"], ref["skipped"])
    assert report["skip_rate"] == pytest.approx(ref["skipped"] / ref["tokens"])
    assert sum(layer["tokens"] for layer in report["layers"].values()) == ref["tokens"]
    assert len(report["processes"]) == processes
    assert sum(p["skipped"] for p in report["processes"]) == ref["skipped"]
    assert all(p["tokens"] > 0 for p in report["processes"])


# ---- evaluation ---------------------------------------------------------------------------------
def test_stock_cli_reads_the_written_tasks(tiny_mixtral, arc_dir, written_tasks, tmp_path, monkeypatch):
    """`lm_eval --model hf --include_path <what python -m eval.tasks wrote>`: the stock CLI, unchanged."""
    from model import load_model

    out = tmp_path / "out"
    stock_cli(monkeypatch, "--model", "hf", "--model_args", f"pretrained={tiny_mixtral}",
              "--include_path", str(written_tasks), *arc_flags(out))
    results, cli_lls = read_outputs(out)
    model, tokenizer = load_model(str(tiny_mixtral), device="cpu")
    docs = arc_docs(arc_dir)
    lls, _ = arc_loglikelihoods(model, tokenizer, docs)
    assert_arc(results, cli_lls, lls, accuracies(docs, lls))
    assert str(arc_dir.resolve() / "arc_easy_test.jsonl") in json.dumps(results["configs"]["arc_easy_local"]["dataset_kwargs"])
    assert "dynamic_skipping" not in results["config"]


def test_moe_skip_through_the_stock_cli(skipping_ckpt, skipping_reference, written_tasks, tmp_path, monkeypatch):
    """`--model moe-skip` in lm-eval's own CLI (registered by importing eval.lm_eval_model) evaluates WITH
    skipping: the same log-likelihoods, accuracies and skip counts as the model computes here, and the same
    accuracies and counts as lm-eval on the in-memory model from `load_model` (the way before the registry)."""
    import eval.lm_eval_model  # noqa: F401  (registers moe-skip)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from model import load_model

    out = tmp_path / "out"
    stock_cli(monkeypatch, "--model", "moe-skip", "--model_args", f"pretrained={skipping_ckpt}",
              "--include_path", str(written_tasks), *arc_flags(out))
    results, cli_lls = read_outputs(out)
    ref = skipping_reference
    assert_arc(results, cli_lls, ref["lls"], ref["acc"])
    assert_skip_counts(results["config"]["dynamic_skipping"], ref)

    model, tokenizer = load_model(str(skipping_ckpt), device="cpu")
    in_memory = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=["arc_easy_local"], limit=LIMIT,
        task_manager=TaskManager(include_path=str(written_tasks), include_defaults=False))
    metrics = in_memory["results"]["arc_easy_local"]
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == pytest.approx(ref["acc"])
    assert (model.dynamic_skipping.stats()["tokens"], model.dynamic_skipping.stats()["skipped"]) == \
        (ref["tokens"], ref["skipped"])


def test_runner_shorthand_and_skipping_off(skipping_ckpt, skipping_reference, arc_dir, tmp_path):
    """eval/run_lm_eval.py: --model_path and --data_dir; `skipping=False` evaluates the dense model."""
    out = tmp_path / "out"
    assert run("--model_path", str(skipping_ckpt), "--data_dir", str(arc_dir), "--model_args", "skipping=False",
               *arc_flags(out)) == 0
    results, runner_lls = read_outputs(out)
    assert_arc(results, runner_lls, skipping_reference["dense_lls"], skipping_reference["dense_acc"])
    assert results["config"]["model"] == "moe-skip"
    assert results["config"]["dynamic_skipping"] == {"enabled": False, "betas": BETAS}


def test_data_parallel_equals_one_process(skipping_ckpt, skipping_reference, arc_dir, tmp_path):
    """Two processes (lm-eval's data parallelism, on the CPU through gloo): each evaluates half the documents
    (here 20 requests each: lm-eval pads a shorter share with copies of its last request, uncounted), and the skip
    counters of both are gathered.
    The accuracies, log-likelihoods and counts are still those of the model computed here in one process."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "lm_eval_dp_entry.py"), "--model_path", str(skipping_ckpt), "--data_dir", str(arc_dir),
         "--device", "cpu", "--batch_size", "1", *arc_flags(out)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, lls = read_outputs(out)
    assert_arc(results, lls, skipping_reference["lls"], skipping_reference["acc"])
    assert_skip_counts(results["config"]["dynamic_skipping"], skipping_reference, processes=2)


def test_include_path_task(tiny_mixtral, arc_dir, tmp_path):
    """A user's own task YAML under --include_path runs (here: ARC-Easy again, under another name)."""
    include = tmp_path / "my_tasks"
    include.mkdir()
    text = (bundled.TASKS_DIR / "arc_easy_local.yaml").read_text()
    (include / "my_arc.yaml").write_text(
        text.replace("task: arc_easy_local", "task: my_arc").replace(bundled.PLACEHOLDER, str(arc_dir)))
    out = tmp_path / "out"
    assert run("--model_path", str(tiny_mixtral), "--tasks", "my_arc", "--include_path", str(include),
               "--limit", "2", "--output_path", str(out)) == 0
    (results,) = out.glob("*/results_*.json")
    assert "my_arc" in json.loads(results.read_text())["results"]


# ---- the resolved task files --------------------------------------------------------------------
def test_written_tasks_hold_the_data_folder(written_tasks, arc_dir):
    names = sorted(p.stem for p in written_tasks.glob("*.yaml"))
    assert names == sorted(STOCK)
    assert (written_tasks / "hellaswag_local_utils.py").is_file()
    for path in written_tasks.glob("*.yaml"):
        text = path.read_text()
        assert bundled.PLACEHOLDER not in text
        for name in bundled.local_tasks()[path.stem]:
            assert f'"{arc_dir.resolve() / name}"' in text


def test_task_writer_missing_data_folder(tmp_path, capsys):
    assert write_tasks.main(["--data_dir", str(tmp_path / "no_data"), "--write", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"python -m eval.tasks: error: data folder {tmp_path / 'no_data'} (from --data_dir) does not "
                   f"exist: pass --data_dir DIR or set {bundled.DATA_ENV}")
    assert not (tmp_path / "t").exists()


def test_task_writer_names_a_missing_file_and_the_right_folder(tmp_path, capsys):
    """The shared data root instead of its eval/ folder: the error says which folder holds the files."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "boolq_validation.jsonl").write_text("")
    assert write_tasks.main(["--data_dir", str(tmp_path), "--write", str(tmp_path / "t"), "--tasks",
                             "boolq_local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"needs {tmp_path / 'boolq_validation.jsonl'}, which is missing ({tmp_path / 'eval'}" in err


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "arc_easy_local,nope"], "--tasks 'arc_easy_local,nope': unknown nope; local tasks: "),
    (["--tasks", ","], "--tasks ',': empty; local tasks: "),
])
def test_task_writer_bad_task_names(argv, needle, tmp_path, capsys):
    assert write_tasks.main(["--write", str(tmp_path / "t"), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_task_writer_target_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert write_tasks.main(["--write", str(tmp_path / "f")]) == 2
    assert f"--write {tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err


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
    monkeypatch.delenv(bundled.DATA_ENV, raising=False)
    argv = ["--model_path", "unused", "--tasks", "arc_easy_local", "--output_path", str(tmp_path / "out")]
    if how == "flag":
        argv += ["--data_dir", str(missing)]
    elif how == "env":
        monkeypatch.setenv(bundled.DATA_ENV, str(missing))
    else:
        monkeypatch.setattr(bundled, "DEFAULT_DATA_DIR", missing)
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert "--data_dir" in err and bundled.DATA_ENV in err
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


def test_config_file_values_are_checked(tmp_path, capsys):
    """lm-eval's --config YAML supplies what the command line leaves out; those values get the same checks."""
    config = tmp_path / "run.yaml"
    config.write_text(f"model_args: pretrained={tmp_path / 'no_model'}\ntasks: arc_easy_local\n")
    assert run("--config", str(config), "--data_dir", str(empty_arc_data(tmp_path)),
               "--output_path", str(tmp_path / "out")) == 2
    assert "no_model: no such folder" in one_line_error(capsys)
    assert run("--config", str(tmp_path / "missing.yaml"), "--tasks", "arc_easy_local") == 2
    assert f"--config {tmp_path / 'missing.yaml'}: Config file not found" in one_line_error(capsys)


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
    for src in bundled.TASKS_DIR.iterdir():
        if src.suffix in (".yaml", ".py"):
            (tasks / src.name).write_text(src.read_text())
    (tasks / "boolq_local.yaml").write_text(BROKEN_YAML)
    monkeypatch.setattr(run_lm_eval, "TASKS_DIR", tasks)
    assert run("--model_path", str(tmp_path / "no_model"), "--tasks", "arc_easy_local", "--data_dir",
               str(empty_arc_data(tmp_path)), "--output_path", str(tmp_path / "out")) == 2
    assert f"task file {tasks / 'boolq_local.yaml'} does not parse (line 3, column " in one_line_error(capsys)


def test_task_yamls_with_tags_parse():
    """The check accepts lm-eval's own tags (`!function`): every stock task YAML passes it."""
    bundled.check_task_files([bundled.TASKS_DIR, STOCK_TASKS / "hellaswag", STOCK_TASKS / "gsm8k"])


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
    local = _load_task_yaml(bundled.TASKS_DIR / f"{task}.yaml")
    stock = _load_task_yaml(STOCK_TASKS / STOCK[task])
    assert local["task"] == task  # the runner names local tasks by their file names
    assert local["dataset_path"] == "json"
    assert {k: v for k, v in local.items() if k not in DATA_KEYS} == {k: v for k, v in stock.items()
                                                                      if k not in DATA_KEYS}


def test_every_local_task_is_checked():
    assert set(bundled.local_tasks()) == set(STOCK)


def test_help_documents_every_flag():
    """Its own flags, then lm-eval's `run` flags (all of which it takes)."""
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "run_lm_eval.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--model_path", "--data_dir", "moe-skip", "skipping=False", "arc_easy_local",  # ours
                 "--model", "--model_args", "--tasks", "--output_path", "--include_path", "--num_fewshot",
                 "--batch_size", "--limit", "--seed", "--device", "--log_samples", "--gen_kwargs"):  # lm-eval's
        assert flag in proc.stdout


def test_batch_size_search_is_not_counted(skipping_ckpt):
    """`--batch_size auto` runs trial batches of dummy tokens through the (skipping) model: not counted."""
    from eval.lm_eval_model import MoESkipLM

    lm = MoESkipLM(pretrained=str(skipping_ckpt), device="cpu", batch_size="auto", max_batch_size=4, max_length=64)
    assert lm.skipping
    assert lm._detect_batch_size() == 4
    assert lm.dynamic_skipping.stats()["tokens"] == 0
    with torch.no_grad():  # while a forward pass outside the search is
        lm.model(torch.tensor([[1, 5, 7]]))
    assert lm.dynamic_skipping.stats()["tokens"] == N_LAYERS * 3
