"""Shared fixtures: paths to ../shared/data, a small tokenizer, tiny random MoE models."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (model/kernels.py) run in Triton's CPU interpreter in the tests; the flag is read when
    # the kernels are defined, so it is set before anything imports them. The model code itself never
    # sends CPU tensors to the kernels (it uses their torch reference there).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEMO = REPO / "demo" / "tiny-moe"  # the bundled trained demo model


def load_script(name: str):
    """scripts/<name>.py as a module, executed once per session (sys.modules), so every test file shares it."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]

SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
C4 = "calib/c4-train.00000-of-01024.first1000.json"


def shared_path(rel: str) -> Path:
    """Path of a file in ../shared/data; skip without it, but fail when CI is set."""
    p = SHARED_DATA / rel
    if not p.exists():
        msg = f"{p} is not present (tests that read ../shared/data need it)"
        if os.environ.get("CI"):
            pytest.fail(msg + " and CI is set")
        pytest.skip(msg)
    return p


@pytest.fixture(scope="session")
def c4_path() -> Path:
    return shared_path(C4)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, c4_path) -> Path:
    """A 512-token byte-level BPE tokenizer trained on the C4 sample (adds <s> like Mixtral's)."""
    from data import read_texts, save_tokenizer, train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_bpe_tokenizer(read_texts(c4_path)[:300], vocab_size=512, model_max_length=4096), out)
    return out


def tiny_mixtral_config(vocab_size: int = 512, n_experts: int = 8, top_k: int = 2, layers: int = 2, **kw):
    from transformers import MixtralConfig

    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=n_experts,
                num_experts_per_tok=top_k, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=2)
    base.update(kw)
    return MixtralConfig(**base)


def save_model(config, path: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init uses std 0.02: make routing less uniform so experts differ clearly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate.weight" in name or "router" in name:
                p.mul_(25.0)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture
def tiny_mixtral(tmp_path, tokenizer_dir) -> Path:
    return save_model(tiny_mixtral_config(), tmp_path / "tiny-mixtral", tokenizer_dir)


# ---- greedy decoding compared between two implementations -----------------------------------------------------
from model.static_decode import GREEDY_TIE_MARGIN, greedy_agreement, greedy_reference  # noqa: E402,F401


def assert_same_greedy_tokens(out, ref, scores, margin, min_compared):
    """`out` equals the reference `ref` in every sequence up to the reference's first tie (top-two logit gap below
    `margin` = (absolute, relative to the top logit), as GREEDY_TIE_MARGIN); at that step `out` holds one of the
    tied tokens (after it the sequences may legitimately part). At least `min_compared` steps in all must come
    before a tie, so the check keeps its teeth.
    (model.static_decode.greedy_agreement, which scripts/gpu_decode_check.py reports on the GPU.)"""
    a = greedy_agreement(out, ref, scores, *margin)
    for b, (k, equal, tie_ok) in enumerate(zip(a["steps_before_tie"], a["equal_before_tie"], a["tie_token_ok"])):
        assert equal, (b, k, out[b], ref[b])
        assert tie_ok is not False, (b, k, out[b], ref[b])  # one of the tied tokens (bfloat16 can tie three or more)
    compared = sum(a["steps_before_tie"])
    assert compared >= min_compared, f"only {compared} greedy steps before a tie: {a['steps_before_tie']}"
