"""Result checkpoints load as the same model in transformers 4.57 and 5.17 (model/checkpoint.py).

The first tests run in this (5.17) venv only: the output config.json is the input's with only the expert
counts and `betas` changed, weights keep the input's names, tokenizer files are the input's. The last one,
`test_transformers_4_loads_the_same_model`, loads every family's pruned and skipping checkpoint in a second
venv with transformers 4.57 (MOE_TF4_PYTHON, set by .ci/run) and compares logits and token ids with 5.17.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

import main
from compat.check_tf4 import TEXTS
from model.adapters import ADAPTERS, find_moe_blocks
from model.checkpoint import COUNT_KEYS, result_config, save_checkpoint

from conftest import DEMO, REPO
from families import FAMILIES, family_config

CHECK_TF4 = REPO / "tests" / "compat" / "check_tf4.py"
KEPT = [0, 1, 2, 4, 5, 6]  # 3 of each group of 4: valid for the group-limited families too
# Checkpoint (hub) weight names: one tensor per expert (`...experts.<i>.w1.weight`), or, for GPT-OSS, fused
# tensors `...experts.<param>` and the router's rows, whose first dimension indexes the experts.
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
EXPERT_ROWS = re.compile(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$|\.experts\.[a-z_]+$")


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def pruned_shapes(shapes: dict[str, tuple[int, ...]], r: int) -> dict[str, tuple[int, ...]]:
    """The input's names and shapes after keeping r experts: experts r.. gone, expert rows cut to r."""
    out = {}
    for name, shape in shapes.items():
        m = EXPERT_INDEX.search(name)
        if not (m and int(m[1]) >= r):
            out[name] = (r, *shape[1:]) if EXPERT_ROWS.search(name) else shape
    return out


def assert_keeps_input_keys(source: dict, out: dict, n_experts: int, betas: dict | None) -> None:
    """Every input key is in the output with its value, except the expert counts and `betas`."""
    counts = COUNT_KEYS[source["model_type"]]
    changed = {k: (source[k], out.get(k)) for k in source
               if k not in counts and k != "betas" and out.get(k, KeyError) != source[k]}
    assert not changed, f"input config keys lost or changed: {changed}"
    assert set(out) - set(source) <= {*counts, "betas"}
    assert {k: out[k] for k in counts} == dict.fromkeys(counts, n_experts)
    assert out.get("betas") == betas


# ---- the expert-count table --------------------------------------------------------------------

def test_count_keys_cover_every_family_and_every_5x_spelling():
    assert set(COUNT_KEYS) == set(ADAPTERS)
    for family, keys in COUNT_KEYS.items():
        assert set(ADAPTERS[family].count_config_keys) <= set(keys), family  # what pruning sets in 5.x
        aliases = CONFIG_MAPPING[family].attribute_map
        for alias, target in aliases.items():
            assert (alias in keys) == (target in keys), f"{family}: {alias} -> {target}"
        # 5.17 reads a config.json holding every spelling as that count, whatever its attribute is called.
        config = CONFIG_MAPPING[family](**dict.fromkeys(keys, 6))
        assert all(getattr(config, k) == 6 for k in keys), family


# ---- result_config: the dict rules, on hand-written inputs ---------------------------------------

def test_result_config_updates_dtype_only_when_the_weights_changed_it():
    src = {"model_type": "mixtral", "num_local_experts": 8, "torch_dtype": "float32", "rope_theta": 500.0}
    out = result_config(src, 6, None, torch.bfloat16, None)
    assert out == {**src, "num_local_experts": 6, "num_experts": 6, "torch_dtype": "bfloat16"}
    same = {**src, "dtype": "float32"}
    assert result_config(same, 8, None, torch.float32, None) == {**same, "num_experts": 8}
    assert result_config({"model_type": "phimoe"}, 4, None, torch.float16, None) == {
        "model_type": "phimoe", "num_local_experts": 4, "torch_dtype": "float16", "dtype": "float16"}


def test_result_config_drops_stale_betas_and_unused_quantization_config():
    src = {"model_type": "gpt_oss", "num_local_experts": 32, "dtype": "bfloat16", "betas": {"0": 0.3},
           "quantization_config": {"quant_method": "mxfp4"}}
    out = result_config(src, 16, None, torch.bfloat16, None)
    assert out == {"model_type": "gpt_oss", "num_local_experts": 16, "num_experts": 16, "dtype": "bfloat16"}
    kept = result_config(src, 16, {"0": 0.5}, torch.bfloat16, {"quant_method": "mxfp4", "x": 1})
    assert kept["betas"] == {"0": 0.5} and kept["quantization_config"] == {"quant_method": "mxfp4", "x": 1}


# ---- save_checkpoint on every family (5.17) -------------------------------------------------------

def make_input(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny checkpoint with a non-default RoPE base, the demo tokenizer, a generation config, custom code,
    and config keys 5.x save_pretrained would not write back: top-level `rope_theta` (the 4.x spelling)
    and a key no config class knows."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, rope_theta=500.0)).float()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(rope_theta=500.0, custom_key={"kept": [1, 2]})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, folder / name)
    (folder / "configuration_custom.py").write_text("# custom code named by auto_map\n")
    return folder


@pytest.mark.parametrize("method", ["pruning", "skipping"])
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_keeps_input_config_weights_names_and_tokenizer(family, method, tmp_path):
    src = make_input(family, tmp_path / "input")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    blocks = find_moe_blocks(model)
    betas = None
    if method == "pruning":
        for adapter, block in blocks.values():
            adapter.prune(block, KEPT)
        next(iter(blocks.values()))[0].prune_config(model.config, len(KEPT))
    else:
        betas = {str(idx): 0.25 + 0.1 * idx for idx in blocks}
        model.config.betas = betas
    out = tmp_path / "out"
    save_checkpoint(model, tokenizer, src, out)

    source = json.loads((src / "config.json").read_text())
    assert_keeps_input_keys(source, json.loads((out / "config.json").read_text()),
                            len(KEPT) if method == "pruning" else 8, betas)
    # Weight names are the input's (what transformers 4.x and vLLM read); only expert dimensions shrink.
    assert weight_shapes(out) == pruned_shapes(weight_shapes(src), len(KEPT) if method == "pruning" else 8)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "configuration_custom.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters["rope_theta"] == 500.0
    assert getattr(reloaded.config, "betas", None) == betas
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Same library, weights and shapes: only the reload differs, so the tolerance is float32's default.
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bfloat16_result_of_a_float32_input_says_bfloat16(tmp_path):
    src = make_input("mixtral", tmp_path / "input")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    save_checkpoint(model, AutoTokenizer.from_pretrained(src), src, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert json.loads((src / "config.json").read_text())["dtype"] == "float32" and config["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # 5.x default: the config's dtype
    assert reloaded.dtype == torch.bfloat16
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Same bfloat16 weights and kernels, only the reload differs: bfloat16's default tolerance.
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_hub_id_input_falls_back_to_save_pretrained_with_a_warning(tmp_path, caplog):
    src = make_input("qwen2_moe", tmp_path / "input")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        save_checkpoint(model, AutoTokenizer.from_pretrained(src), "some-org/some-moe", tmp_path / "out")
    assert "some-org/some-moe is not a local checkpoint folder" in caplog.text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 500.0  # 5.x's own config
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("a b")["input_ids"] == [1, 67, 286]


def test_demo_tokenizer_names_a_class_every_version_has_and_encodes_as_its_tokenizer_json():
    from tokenizers import Tokenizer

    assert json.loads((DEMO / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(DEMO)
    raw = Tokenizer.from_file(str(DEMO / "tokenizer.json"))  # the tokenizers library alone: the reference
    for text in TEXTS:
        assert tok(text)["input_ids"] == raw.encode(text).ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (1, 2, 2, 512)


# ---- transformers 4.57 (second venv) -----------------------------------------------------------------

def tf4_python() -> str:
    """The 4.57 venv's python: skipped without it, failed when CI is set (.ci/run creates it)."""
    path = os.environ.get("MOE_TF4_PYTHON")
    if path and Path(path).is_file():
        return path
    why = (f"MOE_TF4_PYTHON={path} is not a file" if path else "MOE_TF4_PYTHON is not set") + \
        " (the transformers 4.57 venv that .ci/run creates from tests/compat/requirements-tf4.txt)"
    if path or os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def run_tf4(python: str, *args) -> None:
    done = subprocess.run([python, str(CHECK_TF4), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"check_tf4.py {args[0]} failed:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def tf4_results(tmp_path_factory):
    """WORKDIR with, per family: input/ (written by 4.57), pruned/ and skipping/ (main.py here, 5.17),
    tf5.pt (5.17 logits and token ids) and <checkpoint>/tf4.pt (the same from 4.57)."""
    python = tf4_python()
    work = tmp_path_factory.mktemp("tf4")
    run_tf4(python, "make", work)
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"{TEXTS[i % len(TEXTS)]} Document {i}, part {i * 7 % 5}."}) + "\n"
                             for i in range(48)))
    text = " ".join(TEXTS[:1] * 3)  # ~30 tokens: RoPE positions matter
    for family_dir in sorted(p for p in work.iterdir() if (p / "input").is_dir()):
        common = ["--calib_set", "c4", "--calib_path", str(calib), "--max_block_size", "32", "--n_blocks_for_stat",
                  "2", "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--dtype", "float32"]
        pruned = main.run(main.parse_args(["--method", "layerwise_pruning", "--r", "6", "--model_path",
                                           str(family_dir / "input"), "--output_path", str(family_dir / "runs"),
                                           *common]))
        skipping = main.run(main.parse_args(["--method", "dynamic_skipping", "--model_path", str(pruned),
                                             "--output_path", str(family_dir / "runs"), *common]))
        pruned.rename(family_dir / "pruned")
        skipping.rename(family_dir / "skipping")
        ids = AutoTokenizer.from_pretrained(family_dir / "input")(text, return_tensors="pt").input_ids
        torch.save(ids, family_dir / "ids.pt")
        tf5 = {}
        for name in ("input", "pruned", "skipping"):
            model = AutoModelForCausalLM.from_pretrained(family_dir / name, dtype=torch.float32).eval()
            with torch.no_grad():
                tf5[name] = {"logits": model(input_ids=ids).logits,
                             "token_ids": [AutoTokenizer.from_pretrained(family_dir / name)(t)["input_ids"]
                                           for t in TEXTS]}
        torch.save(tf5, family_dir / "tf5.pt")
    run_tf4(python, "load", work)
    return work


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_4_loads_the_same_model(tf4_results, family):
    skipped = json.loads((tf4_results / "tf4_skipped.json").read_text())
    if family in skipped:
        pytest.skip(skipped[family])
    d = tf4_results / family
    tf5 = torch.load(d / "tf5.pt")
    configs = {name: json.loads((d / name / "config.json").read_text()) for name in tf5}
    betas = configs["skipping"].get("betas")
    assert betas and set(betas) == set(json.loads((d / "skipping" / "pruning_info.json").read_text())["layers"])
    assert_keeps_input_keys(configs["input"], configs["pruned"], 6, None)
    assert_keeps_input_keys(configs["pruned"], configs["skipping"], 6, betas)
    assert weight_shapes(d / "skipping") == weight_shapes(d / "pruned") == pruned_shapes(weight_shapes(d / "input"), 6)
    for name in ("input", "pruned", "skipping"):
        tf4 = torch.load(d / name / "tf4.pt")
        assert tf4["transformers"].startswith("4.57.")
        errors = {k: v for k, v in tf4.items() if k.endswith("_error")}
        assert not errors, f"transformers {tf4['transformers']} cannot load {name}: {errors}"
        assert not any(tf4["loading_info"].values()), f"{name}: {tf4['loading_info']}"
        assert tf4["rope"]["rope_theta"] == 500.0, name
        assert set(tf4["n_experts"].values()) == {8 if name == "input" else 6}, (name, tf4["n_experts"])
        assert tf4["betas"] == (betas if name == "skipping" else None)
        assert tf4["token_ids"] == tf5[name]["token_ids"], f"{name}: tokenizers differ ({tf4['tokenizer_class']})"
        # float32 on both sides; the kernels differ (4.57 loops over experts, 5.17 runs fused experts), so
        # sums are ordered differently: measured max |diff| 2e-6 on logits of magnitude <= 5 after 2-3 layers.
        # 5e-5 is 25x that; a lost RoPE setting or a wrong expert count gives differences of 1 or more.
        torch.testing.assert_close(tf4["logits"], tf5[name]["logits"], atol=5e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        # Negative control: RoPE matters in this test. The 4.57 class defaults instead of the saved
        # rope_theta / rope_scaling change the logits far beyond the tolerance.
        assert (tf4["logits_default_rope"] - tf5[name]["logits"]).abs().max() > 0.1, (name, tf4["default_rope"])
