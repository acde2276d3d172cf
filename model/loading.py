"""One loading function for every script and for users: `model, tokenizer = load_model(path)`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .fused_experts import FUSED, triton_available
from .dynamic_skipping import BetasError, DynamicSkipping

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}
# from_pretrained arguments that say where the config is (the rest are the model's).
CONFIG_LOCATION_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "trust_remote_code")
# A Hugging Face Hub id ("name" or "org/name"); anything else can only be a local folder.
HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


class CheckpointError(ValueError):
    """A model path that cannot be a checkpoint: no such folder, or a folder without config.json."""


def looks_local(path: str) -> bool:
    """True for what can only be a local path: not a hub id ("/abs", "./x", "~/x", "a/b/c"), or "a/b" with a
    local folder "a" (e.g. "output/run"), where a typo should not send transformers to the hub."""
    return not HUB_ID.match(path) or ("/" in path and Path(path.split("/")[0]).is_dir())


def check_model_path(path: str) -> None:
    """Fail at once on a local path that is not a checkpoint (instead of transformers' hub-id errors and
    retries); a hub id passes unchecked."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"model folder {path} has no config.json: not a checkpoint folder")
    elif p.exists():
        raise CheckpointError(f"model path {path} is a file: give the checkpoint's folder")
    elif looks_local(path):
        raise CheckpointError(f"model path {path}: no such folder")


def check_checkpoint(path: str | os.PathLike, skipping: bool = True, **location_kwargs):
    """What can be checked before any weight is read: the path, its config and (when `skipping`) its `betas`,
    against the model's MoE layers built on the meta device. Returns the config.

    location_kwargs: from_pretrained keyword arguments; those that locate the config (CONFIG_LOCATION_KWARGS:
    revision, subfolder, trust_remote_code, ...) and are set are used, the rest ignored.
    Raises CheckpointError, BetasError, MoEError (betas on a model with no supported MoE layer), and
    OSError/ValueError from transformers for an unreadable config.
    """
    path = os.path.expanduser(path)
    location_kwargs = {k: v for k, v in location_kwargs.items() if k in CONFIG_LOCATION_KWARGS and v}
    subfolder = location_kwargs.get("subfolder")
    folder = os.path.join(path, subfolder) if subfolder and os.path.isdir(path) else path  # where config.json is
    check_model_path(folder)
    config = AutoConfig.from_pretrained(path, **location_kwargs)
    if skipping and hasattr(config, "betas"):
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                config, trust_remote_code=bool(location_kwargs.get("trust_remote_code")))
        try:
            DynamicSkipping(skeleton)  # validates the betas; hooks exist only after enable()
        except BetasError as e:
            raise BetasError(f"{Path(folder, 'config.json')}: {e}") from None
    return config


def load_model(path: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               skipping: bool = True, tokenizer_path: str | None = None, experts_implementation: str | None = None,
               **from_pretrained_kwargs):
    """Load a (pruned, skipping, or plain) checkpoint and its tokenizer.

    device: "cuda", "cuda:1", "cpu", or "auto" (accelerate's device_map, for models larger
            than one GPU); default: the GPU when there is one.
    dtype:  a torch dtype or its name; default: the checkpoint's own dtype.
    When the config has `betas` (ours or the original code's checkpoints) and `skipping`
    is true, dynamic skipping is switched on; `model.dynamic_skipping` is its controller
    (`.disable()`, `.enable()`, `.stats()`), None otherwise.
    experts_implementation: transformers' name ("eager", "grouped_mm", ...) or "fused"; default:
            "fused" (the Triton decode kernels, model/fused_experts.py) on a GPU when Triton is
            installed, transformers' choice otherwise.
    Bad betas (see `model.dynamic_skipping.check_betas`) and a local path that is not a checkpoint
    raise before any weight is read.
    """
    path = os.path.expanduser(path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    config = check_checkpoint(path, skipping, **from_pretrained_kwargs)
    kwargs = {"dtype": dtype if dtype is not None else "auto", **from_pretrained_kwargs}
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device) == "auto":
        kwargs.setdefault("device_map", "auto")
    if experts_implementation is None and str(device).startswith("cuda") and triton_available():
        experts_implementation = FUSED
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if str(device) != "auto" and "device_map" not in from_pretrained_kwargs:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
    model.dynamic_skipping = None
    if skipping and hasattr(config, "betas"):
        model.dynamic_skipping = DynamicSkipping(model).enable()
    return model, tokenizer
