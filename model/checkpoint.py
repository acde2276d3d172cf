"""Write a result checkpoint that loads as the same model in transformers 4.x, 5.x and vLLM.

transformers 5.x `save_pretrained` writes the weights under the checkpoint's own (hub) names, which
transformers 4.x and vLLM read, but writes config.json in the 5.x form only: the RoPE settings go under
`rope_parameters` (4.x reads `rope_theta` / `rope_scaling` and silently falls back to its defaults) and some
expert counts under their 5.x spelling (Qwen3-MoE's `num_local_experts`; 4.x reads `num_experts`, default
128). So `save_checkpoint` keeps the weights of `save_pretrained` and writes config.json from the INPUT
checkpoint's config.json, changing only what the method changed: the routed-expert count (in every spelling
of `COUNT_KEYS`), `betas`, the dtype keys when the saved weights have another dtype, and
`quantization_config` when the weights are no longer stored quantized. The tokenizer files, the generation
config and any custom code (`auto_map`) are copied verbatim from the input folder: pruning does not change
them, and a copy loads wherever the input loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers.tokenization_utils_base import (
    ADDED_TOKENS_FILE,
    FULL_TOKENIZER_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)
from transformers.utils import CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE

from .adapters import MoEError, find_moe_blocks

logger = logging.getLogger(__name__)

# Every config.json key that holds the routed-expert count, per model_type: the attribute each
# family's config class stores in transformers 4.57 and in 5.17, and the aliases 5.17's `attribute_map`
# reads into it (a stale alias in config.json would overwrite the count on load). Keys a version does not
# know become plain attributes there, so writing all of them is harmless everywhere.
COUNT_KEYS: dict[str, tuple[str, ...]] = {
    "mixtral": ("num_local_experts", "num_experts"),  # 5.17 alias num_experts
    "qwen2_moe": ("num_experts",),
    "qwen3_moe": ("num_experts", "num_local_experts"),  # 4.57 reads num_experts; 5.17 stores num_local_experts
    "olmoe": ("num_experts", "num_local_experts"),  # 5.17 alias num_local_experts
    "deepseek_v2": ("n_routed_experts", "num_experts"),  # 5.17 alias num_experts
    "deepseek_v3": ("n_routed_experts", "num_local_experts"),  # 5.17 alias num_local_experts
    "glm4_moe": ("n_routed_experts", "num_local_experts"),  # 5.17 alias num_local_experts
    "phimoe": ("num_local_experts",),
    "gpt_oss": ("num_local_experts", "num_experts"),  # 5.17 alias num_experts
}

# Both spellings of the weights' dtype: transformers < 4.56 reads only `torch_dtype`, 5.x writes `dtype`.
DTYPE_KEYS = ("torch_dtype", "dtype")
GENERATION_CONFIG = "generation_config.json"
# Vocabulary files of the slow and fast tokenizer classes (Llama/SentencePiece, GPT-2/BPE, BERT/WordPiece).
VOCAB_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def result_config(source: dict, n_experts: int, betas: dict | None, weights_dtype: torch.dtype,
                  quantization_config: dict | None) -> dict:
    """The output config.json: the input's `source` dict with only what the method changed.

    n_experts:           routed experts per MoE layer of the saved model (written in every COUNT_KEYS spelling);
    betas:               the model's dynamic-skipping betas, or None (then a stale input `betas` is dropped:
                         pruning removes betas calibrated on the unpruned routing);
    weights_dtype:       dtype of the saved weights;
    quantization_config: what 5.x `save_pretrained` wrote for the saved weights (None: stored unquantized).
    """
    out = dict(source)
    for key in COUNT_KEYS[source["model_type"]]:
        out[key] = n_experts
    if betas:
        out["betas"] = betas
    else:
        out.pop("betas", None)
    # The loaders take the dtype from the config (5.x by default, 4.x with dtype="auto"); when the method saved
    # another dtype than the input declares (e.g. a float32 input run in bfloat16), the config must say so.
    # Every spelling the input uses is updated; an input without one gets both.
    dtype = str(weights_dtype).removeprefix("torch.")
    declared = [k for k in DTYPE_KEYS if k in source]
    if any(source[k] != dtype for k in declared) or not declared:
        for key in declared or DTYPE_KEYS:
            out[key] = dtype
    if quantization_config is None:
        out.pop("quantization_config", None)  # e.g. an MXFP4 / FP8 input dequantized on load and saved unquantized
    else:
        out["quantization_config"] = quantization_config
    return out


def tokenizer_files(tokenizer) -> set[str]:
    """File names a tokenizer folder may hold: the transformers constants and the class's own vocab files."""
    return {TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE, FULL_TOKENIZER_FILE,
            CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE, *VOCAB_FILES,
            *tokenizer.vocab_files_names.values()}


def routed_experts(model) -> int:
    counts = {adapter.num_experts(block) for adapter, block in find_moe_blocks(model).values()}
    if len(counts) != 1:
        raise MoEError(f"MoE layers hold different numbers of experts {sorted(counts)}; config.json has one count")
    return counts.pop()


def save_pretrained(model, out_dir: Path, max_shard_size: int | str = "5GB") -> None:
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)


def save_checkpoint(model, tokenizer, source: str | Path, out_dir: str | Path, write_weights=save_pretrained) -> None:
    """Write `model` and `tokenizer`, loaded from `source` (a checkpoint folder or a hub id), to `out_dir`.

    write_weights(model, out_dir) writes the weights, transformers 5.x's config.json and the generation
    config, as `save_pretrained` does (the default); a streamed model's writer adds its last shard and
    the index to the layers it wrote during the run (model/streaming.py).
    """
    out_dir = Path(out_dir)
    write_weights(model, out_dir)  # weights (and a 5.x config.json, replaced below)
    src = Path(source)
    if not (src / "config.json").is_file():
        logger.warning("%s is not a local checkpoint folder: config.json and the tokenizer are written by "
                       "transformers 5.x save_pretrained and may not load the same in transformers 4.x or vLLM",
                       source)
        tokenizer.save_pretrained(out_dir)
        return
    saved = json.loads((out_dir / "config.json").read_text())
    config = result_config(json.loads((src / "config.json").read_text()), routed_experts(model),
                           getattr(model.config, "betas", None), model.dtype, saved.get("quantization_config"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    copied = [name for name in sorted(tokenizer_files(tokenizer)) if (src / name).is_file()]
    if TOKENIZER_CONFIG_FILE in copied or FULL_TOKENIZER_FILE in copied:
        for name in copied:
            shutil.copyfile(src / name, out_dir / name)
        if (src / CHAT_TEMPLATE_DIR).is_dir():
            shutil.copytree(src / CHAT_TEMPLATE_DIR, out_dir / CHAT_TEMPLATE_DIR)
    else:
        logger.warning("%s has no tokenizer files: the tokenizer is written by transformers 5.x save_pretrained",
                       source)
        tokenizer.save_pretrained(out_dir)
    if (src / GENERATION_CONFIG).is_file():
        shutil.copyfile(src / GENERATION_CONFIG, out_dir / GENERATION_CONFIG)
    # Custom modelling code named by auto_map (e.g. DeepSeek's hub folders): the copied config points at it.
    for path in src.glob("*.py"):
        shutil.copyfile(path, out_dir / path.name)
