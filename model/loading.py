"""One loading function for every script and for users: `model, tokenizer = load_model(path)`."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .fused_experts import FUSED, triton_available
from .skipping import DynamicSkipping

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


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
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
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
    if skipping and getattr(model.config, "betas", None):
        model.dynamic_skipping = DynamicSkipping(model).enable()
    return model, tokenizer
