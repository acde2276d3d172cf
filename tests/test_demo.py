"""The bundled demo model and the README's first command."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import main
from eval.perplexity import perplexity, token_blocks
from data import read_texts

from conftest import REPO, shared_path

DEMO = REPO / "demo" / "tiny-moe"


def test_demo_loads_with_plain_transformers_and_writes_english():
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO)
    assert model.config.model_type == "mixtral"
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    ids = tok("The history of", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 5 and {"the", "of", "and", "in", "was", "a"} & {w.lower() for w in words}


def test_demo_heldout_perplexity_below_model_card_threshold():
    card = (DEMO / "README.md").read_text()
    threshold = float(re.search(r"must stay\s+below \*\*([\d.]+)\*\*", card).group(1))
    texts = read_texts(shared_path("corpus/wiki_heldout.jsonl.xz"))[:20]
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO)
    blocks = token_blocks(texts, tok, 512)
    result = perplexity(model, blocks)
    assert result["tokens_scored"] == blocks.shape[0] * 511
    # Independent check of the number: transformers' own causal-LM loss on the same blocks.
    with torch.no_grad():
        hf = torch.stack([model(input_ids=b[None], labels=b[None]).loss for b in blocks]).mean()
    assert result["perplexity"] == pytest.approx(float(torch.exp(hf)), rel=1e-4)
    assert result["perplexity"] < threshold


def readme_main_command() -> list[str]:
    readme = (REPO / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "python main.py" in l and "demo/tiny-moe" in l)
    return shlex.split(line.split("python main.py", 1)[1])


def test_readme_first_command_runs_and_its_checkpoint_reloads(tmp_path):
    args = readme_main_command()
    assert "--calib_set" in args and args[args.index("--calib_set") + 1] == "self"  # no data file needed
    assert main.main([*args, "--output_path", str(tmp_path)]) == 0
    (result,) = tmp_path.iterdir()
    reloaded = AutoModelForCausalLM.from_pretrained(result)
    r = int(args[args.index("--r") + 1])
    assert reloaded.config.num_local_experts == r
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == r
    info = json.loads((result / "pruning_info.json").read_text())
    assert set(info["layers"]) == {"0", "1", "2", "3"}
    assert all(len(v["kept_experts"]) == r for v in info["layers"].values())


def test_training_script_cpu_smoke(tmp_path):
    """scripts/train_moe.py end to end on the CPU at toy size: tokenizer, training steps, eval, card, save."""
    import subprocess
    import sys

    wiki = shared_path("corpus/wiki_train.jsonl.xz")
    heldout = shared_path("corpus/wiki_heldout.jsonl.xz")
    gsm_train, gsm_test = shared_path("eval/gsm8k_train.jsonl"), shared_path("eval/gsm8k_test.jsonl")
    out = tmp_path / "smoke"
    cmd = [sys.executable, str(REPO / "scripts" / "train_moe.py"), "--tiny", "--max_docs", "300", "--max_steps", "3",
           "--batch_size", "2", "--device", "cpu", "--out", str(out), "--wiki_train", str(wiki),
           "--wiki_heldout", str(heldout), "--gsm8k_train", str(gsm_train), "--gsm8k_test", str(gsm_test)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 8
    assert AutoTokenizer.from_pretrained(out)("a b").input_ids[0] == 1  # BOS added, as the demo's
    assert "perplexity" in (out / "README.md").read_text().lower()
