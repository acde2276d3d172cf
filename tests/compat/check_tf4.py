"""The transformers 4.57 side of the checkpoint compatibility check (run by tests/test_checkpoint_compat.py).

Runs ONLY in the second venv (tests/compat/requirements-tf4.txt); the 5.17 side runs in the main venv.

    python tests/compat/check_tf4.py make WORKDIR   # one input checkpoint per family, written by 4.57
    python tests/compat/check_tf4.py load WORKDIR   # load every checkpoint under WORKDIR/<family>/ with 4.57

`make` writes WORKDIR/<family>/input/, a tiny random model of every family in tests/families.py saved by
transformers 4.57 (config.json and weights in the 4.x / hub format, as real checkpoints are), with the demo
model's tokenizer files and a non-default RoPE (rope_theta 500; YaRN for deepseek_v3 and gpt_oss), so that a
config that loses the RoPE settings gives different logits. Families this transformers does not have are
listed in WORKDIR/tf4_skipped.json with the reason.

`load` loads every checkpoint folder WORKDIR/<family>/<name>/ holding a config.json with AutoModelForCausalLM
and AutoTokenizer, and writes WORKDIR/<family>/<name>/tf4.pt: the logits (float32) on the token ids in
WORKDIR/<family>/ids.pt, the loading report (missing / unexpected / mismatched weights), the token ids the
tokenizer gives for TEXTS, the expert count and RoPE settings the 4.57 config holds, and the logits again with
the RoPE settings reset to the 4.57 class defaults (the negative control: they must differ).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from families import COMMON, FAMILIES, family_config  # noqa: E402

DEMO = REPO / "demo" / "tiny-moe"
DEMO_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Texts the tokenizer must encode identically in both versions: plain, special tokens, unicode, whitespace.
TEXTS = ["The experts of a mixture are not all equal.", "</s><s> x", "naïve café — 東京 🙂", "  two  spaces\nand a tab\t."]
# Non-default RoPE: every 4.57 class default rope_theta is 1e4 or more. YaRN: factor 4 over 64 positions
# (max_position_embeddings 256 = 4 * 64); deepseek_v3's mscale_all_dim also rescales attention scores.
ROPE = {"rope_theta": 500.0}
YARN = {"deepseek_v3": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "gpt_oss": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                    "beta_slow": 1.0, "truncate": False}}
# std of every weight: 1/sqrt(hidden) keeps activations O(1), so attention (and with it RoPE) changes the
# logits clearly; with the usual 0.02 attention is nearly uniform and a wrong RoPE would hardly show.
INIT_STD = COMMON["hidden_size"] ** -0.5


def make(workdir: Path) -> None:
    skipped = {}
    for family in FAMILIES:
        if family not in transformers.CONFIG_MAPPING:
            skipped[family] = f"transformers {transformers.__version__} has no model_type {family!r}"
            continue
        kw = dict(ROPE, vocab_size=8192, initializer_range=INIT_STD)
        if family in YARN:
            kw["rope_scaling"] = dict(YARN[family])
        config = family_config(family, **kw)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float()
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if name.endswith("e_score_correction_bias"):
                    t.normal_(0.0, 0.1)  # zero at init; it must matter for the choice of experts
        out = workdir / family / "input"
        model.save_pretrained(out)
        for name in DEMO_TOKENIZER_FILES:
            shutil.copy(DEMO / name, out / name)
    (workdir / "tf4_skipped.json").write_text(json.dumps(skipped, indent=1))


def rope_of(config) -> dict:
    """The RoPE settings a 4.57 config holds (Mixtral's class has no rope_scaling)."""
    return {k: getattr(config, k) for k in ("rope_theta", "rope_scaling") if hasattr(config, k)}


@torch.no_grad()
def logits_of(path: Path, ids: torch.Tensor, **config_overrides) -> tuple[torch.Tensor, dict, object]:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                       **config_overrides)
    model.eval()
    return model(input_ids=ids).logits, info, model.config


def load(workdir: Path) -> None:
    for family_dir in sorted(p for p in workdir.iterdir() if p.is_dir()):
        ids = torch.load(family_dir / "ids.pt")
        for ckpt in sorted(p for p in family_dir.iterdir() if (p / "config.json").is_file()):
            torch.save({"transformers": transformers.__version__, **load_model(ckpt, ids), **load_tokenizer(ckpt)},
                       ckpt / "tf4.pt")


def load_model(ckpt: Path, ids: torch.Tensor) -> dict:
    """What 4.57 makes of the checkpoint, or the error it raises (recorded so that every family is reported)."""
    try:
        logits, info, config = logits_of(ckpt, ids)
        defaults = type(config)()  # the 4.57 class defaults a config without RoPE keys would get
        wrong_rope, _, _ = logits_of(ckpt, ids, **rope_of(defaults))
    except Exception as e:  # noqa: BLE001 - reported by the test with the checkpoint's name
        return {"model_error": f"{type(e).__name__}: {e}"}
    return {
        "logits": logits,
        "logits_default_rope": wrong_rope,
        "rope": rope_of(config),
        "default_rope": rope_of(defaults),
        "loading_info": {k: [str(x) for x in v] for k, v in info.items()},
        "n_experts": {k: getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                      if isinstance(getattr(config, k, None), int)},
        "betas": getattr(config, "betas", None),
    }


def load_tokenizer(ckpt: Path) -> dict:
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except Exception as e:  # noqa: BLE001
        return {"tokenizer_error": f"{type(e).__name__}: {e}"}
    return {"tokenizer_class": type(tokenizer).__name__, "token_ids": [tokenizer(t)["input_ids"] for t in TEXTS]}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "load"):
        sys.exit("usage: check_tf4.py make|load WORKDIR")
    if not re.match(r"4\.", transformers.__version__):
        sys.exit(f"check_tf4.py runs under transformers 4.x, found {transformers.__version__}")
    {"make": make, "load": load}[sys.argv[1]](Path(sys.argv[2]))
