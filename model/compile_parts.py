"""torch.compile the small library modules around the experts, for the CUDA-graph decode step.

A graph-captured Mixtral decode step still runs ~1,400 kernels at batch 1 (issue #9's profile):
besides the two experts kernels per layer, each RMSNorm is ~6 elementwise/reduction kernels,
the router ~6 (GEMV, softmax, top-k, sort, normalise, cast) and attention ~20 (projections,
rotary `cat`s, cache writes, SDPA). Inductor fuses each of these modules into a few kernels.

`compiled_parts(model, parts)` compiles the chosen modules' `forward` in place (an instance
attribute that shadows the class method; the module's `__call__`, and so its hooks -- the dynamic
skipping hook on the router -- still run eagerly around it) and removes the attributes again when
the context exits, so the model is unchanged afterwards. Parts:

- "norm": every RMSNorm module (one compiled graph, reused by all of them: same code, same shapes);
- "router": each MoE block's router (the skip hook stays outside the compiled code);
- "attention": each decoder layer's self-attention (dynamo specialises on the layer index the cache
  is addressed with: one trace per layer, the compiled kernels shared through inductor's cache).

Whole decoder layers are not offered: dynamo would trace the skip hook inside them, and on the demo
model that changed greedy tokens (a CPU test of this module's first version), where the parts above
leave every token as `generate` gives it.

The experts are not compiled: they already are single Triton kernels (model/kernels.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .adapters import decoder_layers, find_moe_blocks

PARTS = ("norm", "router", "attention")


def parse_parts(text: str) -> tuple[str, ...]:
    """A --compile value, "norm,router,attention", as a tuple of parts; ValueError naming any unknown part."""
    parts = tuple(p for p in text.split(",") if p)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    return parts


def _modules(model: nn.Module, part: str) -> list[nn.Module]:
    if part == "norm":
        return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    if part == "router":
        return [adapter.router(block) for adapter, block in find_moe_blocks(model).values()]
    if part == "attention":
        return [layer.self_attn for layer in decoder_layers(model) if hasattr(layer, "self_attn")]
    raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")


@contextmanager
def compiled_parts(model: nn.Module, parts: Iterable[str], backend: str | Callable = "inductor") -> Iterator[int]:
    """Compile the `parts` of `model` in place for the context's duration; yields how many modules.

    `backend` is torch.compile's, a name or a callable (the CPU tests use "aot_eager": dynamo's tracing without
    code generation, wrapped in a frame counter).
    """
    parts = list(parts)
    if not parts:
        yield 0
        return
    modules = [m for p in parts for m in _modules(model, p)]
    # One dynamo cache entry per distinct guard set: attention needs one per layer (see above).
    limit = max(64, 2 * len(decoder_layers(model)) + 8)
    old = (torch._dynamo.config.cache_size_limit, torch._dynamo.config.accumulated_cache_size_limit)
    torch._dynamo.config.cache_size_limit = max(old[0], limit)
    torch._dynamo.config.accumulated_cache_size_limit = max(old[1], 4 * limit)
    patched = []
    try:
        for m in modules:
            if "forward" in vars(m):
                raise RuntimeError(f"{type(m).__name__} already has an instance forward; not compiling it twice")
            m.forward = torch.compile(m.forward, backend=backend, dynamic=False)
            patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
        torch._dynamo.config.cache_size_limit, torch._dynamo.config.accumulated_cache_size_limit = old
