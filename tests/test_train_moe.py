"""scripts/train_moe.py (the demo model's training script) and the BPE tokenizer helper it shares with the tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import read_texts, save_tokenizer, train_bpe_tokenizer
from eval.perplexity import token_blocks

from conftest import DEMO, REPO, load_script, shared_path

train_moe = load_script("train_moe")
TEXTS = ["The history of the town begins in 1820, when a mill was built on the river.",
         "Tom has 3 boxes with 12 apples in each box. He gives away 10 apples.",
         "In mathematics, a prime number is a natural number greater than 1."] * 20


def test_saved_tokenizer_config_is_the_demo_form(tmp_path):
    """transformers 5 saves tokenizer_class "TokenizersBackend", which transformers 4.57 cannot load: the helper
    writes what the committed demo tokenizer has (PreTrainedTokenizerFast, which tests/test_checkpoint_compat.py
    loads in 4.57), and transformers 5 loads it back as the same tokenizer."""
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300, model_max_length=512)
    save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config == json.loads((DEMO / "tokenizer_config.json").read_text())
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:3]:
        ids = reloaded(text)["input_ids"]
        assert ids[0] == 1 and ids[1:] == tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id, reloaded.unk_token_id) == (1, 2, 2, 0)


def test_evaluate_against_transformers_on_the_demo_model():
    """The script's evaluation (mean next-token NLL and router load per layer) on a trained model, the demo,
    against transformers' own causal-LM loss and the router's own top-2 choices, recorded by hooks."""
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    blocks = token_blocks(TEXTS, AutoTokenizer.from_pretrained(DEMO), 64)  # (n, 64)
    chosen = {l: [] for l in range(4)}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, l=l: chosen[l].append(o[2].reshape(-1)))
             for l, layer in enumerate(model.model.layers)]
    try:
        nll, n_tok, load = train_moe.evaluate(model, blocks, torch.device("cpu"), batch_size=4)
    finally:
        for h in hooks:
            h.remove()
    assert n_tok == blocks.shape[0] * 63
    with torch.no_grad():
        hf = torch.stack([model(input_ids=b[None], labels=b[None]).loss for b in blocks]).mean()
    assert nll == pytest.approx(float(hf), rel=1e-5)  # float32, other batch shapes
    expected = torch.stack([torch.bincount(torch.cat(chosen[l]), minlength=8) for l in range(4)]).double()
    assert torch.equal(load, expected / expected.sum(dim=1, keepdim=True))  # decisions: exact


def test_training_script_cpu_smoke(tmp_path):
    """scripts/train_moe.py end to end on the CPU at toy size: tokenizer, training steps, eval, card, save."""
    wiki = shared_path("corpus/wiki_train.jsonl.xz")
    heldout = shared_path("corpus/wiki_heldout.jsonl.xz")
    gsm_train, gsm_test = shared_path("eval/gsm8k_train.jsonl"), shared_path("eval/gsm8k_test.jsonl")
    out = tmp_path / "smoke"
    cmd = [sys.executable, str(REPO / "scripts" / "train_moe.py"), "--tiny", "--max_docs", "300", "--max_steps", "3",
           "--batch_size", "2", "--device", "cpu", "--out", str(out), "--wiki_train", str(wiki),
           "--wiki_heldout", str(heldout), "--gsm8k_train", str(gsm_train), "--gsm8k_test", str(gsm_test),
           "--heldout_docs", "20", "--max_eval_blocks", "8", "--sample_tokens", "8"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 8
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("a b").input_ids[0] == 1  # BOS added, as the demo's
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    # The reported held-out perplexity against transformers' own loss on the same blocks (<s> doc </s>
    # concatenated, cut into 512-token blocks, the first 8 kept), from the saved weights in float32.
    summary = json.loads((out / "train_summary.json").read_text())
    blocks = token_blocks(read_texts(heldout)[:20], tok, 512)[:8]
    with torch.no_grad():
        nll = torch.stack([model(input_ids=b[None], labels=b[None]).loss for b in blocks]).mean()
    reported = summary["heldout_wiki"]
    assert reported["tokens"] == 8 * 511
    # float32, other batch shapes: the mean NLL moves by far less than 1e-5
    assert reported["ppl"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    card = (out / "README.md").read_text()
    assert f"| {reported['tokens']:,} | **{reported['ppl']:.2f}** |" in card
