"""The "fused" experts implementation: transformers' `ExpertsInterface` entry for fast decoding.

`model.set_experts_implementation("fused")` (what `load_model` does on a GPU) routes every MoE
experts module through `fused_experts_forward`:

- small batches (decoding, at most `SMALL_MAX_PAIRS` routed (token, slot) pairs): two Triton
  kernels (model/kernels.py) that read only the weights of experts some token uses, skip the
  "no expert" sentinel slots and zero-weight slots without reading anything, and never
  synchronise with the host, so a decode step can be captured in a CUDA graph;
- larger batches (prefill): transformers' own `grouped_mm` implementation, unchanged;
- layouts the kernels do not cover (transposed or interleaved gate/up such as GPT-OSS, or an
  activation other than SiLU): the library's eager forward, unchanged.

`fused_experts_reference` is the kernels' semantics in plain torch (float32 accumulation, the
activation rounded to the model dtype between the two projections, weighted slots summed in
float32); it is what runs on a CPU, and what the tests hold the kernels and the library to (the tests run
the kernels themselves on the CPU through Triton's interpreter, `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

FUSED = "fused"
# Above this many routed pairs the batch is a prefill: grouped_mm's tensor-core GEMMs win.
SMALL_MAX_PAIRS = 128
# Tile sizes (output block, reduction block, warps), tuned on an H200 with scripts/tune_fused.py
# (docs/results/h200/tune_fused.json): batch 1 reads the whole reduction row in wide blocks; at
# 16+ rows (tl.dot tiles of 32+ rows) a wider output block wins.
# Shared memory bounds the tiles at 64-128 rows (3 pipeline stages of row tile + weight tile).
BLOCK = {"gate_up": (32, 256, 4), "down": (64, 256, 4)}
BLOCK_WIDE = {"gate_up": (64, 128, 4), "down": (64, 256, 4)}
BLOCK_TALL = {"gate_up": (64, 128, 4), "down": (128, 128, 8)}
# Batch 1-8: 1-2 active experts would give the down kernel fewer programs than SMs; split I.
DOWN_SPLIT = 4


def _is_silu(act: nn.Module) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation") or getattr(act, "__name__", "") == "silu"


def supports_fused(experts: nn.Module) -> bool:
    """Whether the kernels cover this experts module's layout (else it runs the library's own code)."""
    return (getattr(experts, "has_gate", False) and getattr(experts, "is_concatenated", False)
            and not getattr(experts, "is_transposed", True) and _is_silu(getattr(experts, "act_fn", None))
            and type(experts)._apply_gate.__name__ == "_default_apply_gate"
            and getattr(experts, "gate_up_proj", None) is not None and experts.gate_up_proj.dim() == 3)


def _biases(experts: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not getattr(experts, "has_bias", False):
        return None, None
    return experts.gate_up_proj_bias, experts.down_proj_bias


def fused_experts_reference(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                            gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                            down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernels' semantics in torch.

    hidden (T, H); top_k_index, top_k_weights (T, K); gate_up (E, 2I, H); down (E, H, I);
    biases (E, 2I), (E, H). A slot whose index is not in [0, E) or whose weight is 0 adds nothing.
    Returns (T, H) in hidden's dtype.
    """
    t, k = top_k_index.shape
    e_count, h = gate_up.shape[0], hidden.shape[-1]
    idx = top_k_index.reshape(-1)  # (S,) slot s = t * K + k
    w = top_k_weights.reshape(-1).float()
    rows = hidden.repeat_interleave(k, dim=0)  # (S, H)
    y = torch.zeros(t * k, h, dtype=torch.float32, device=hidden.device)
    for e in range(e_count):
        sel = ((idx == e) & (w != 0)).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        gu = rows[sel].float() @ gate_up[e].float().T  # (n, 2I)
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e].float()
        g, u = gu.chunk(2, dim=-1)
        act = (torch.nn.functional.silu(g) * u).to(hidden.dtype)  # rounded like the kernel's act buffer
        out = act.float() @ down[e].float().T  # (n, H)
        if down_bias is not None:
            out = out + down_bias[e].float()
        y[sel] = out * w[sel, None]
    return y.view(t, k, h).sum(dim=1).to(hidden.dtype)


def fused_experts_triton(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                         gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                         down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `fused_experts_reference`, through the Triton kernels (any number of pairs)."""
    import triton

    from . import kernels

    t, k = top_k_index.shape
    e_count, two_i, h = gate_up.shape
    i = two_i // 2
    s = t * k
    s_pad = max(16, triton.next_power_of_2(s))  # tl.dot needs >= 16 rows
    x = hidden.contiguous().to(gate_up.dtype)
    idx = top_k_index.contiguous().view(-1)
    w = top_k_weights.contiguous().view(-1)
    act = torch.empty(s, i, dtype=gate_up.dtype, device=hidden.device)
    split = DOWN_SPLIT if s_pad <= 16 else 1
    y = torch.empty(split, s_pad, h, dtype=torch.float32, device=hidden.device)  # rows >= s never written
    ieee = gate_up.dtype == torch.float32
    upcast = hidden.device.type == "cpu" and not ieee  # the interpreter (see model/kernels.py)
    has_bias = gate_up_bias is not None
    tiles = BLOCK if s_pad <= 16 else BLOCK_WIDE if s_pad <= 32 else BLOCK_TALL
    wide = 2 if ieee else 1  # float32 tiles take twice the shared memory: halve the reduction blocks
    bi, bh, nw = tiles["gate_up"]
    bh //= wide
    kernels.gate_up_kernel[(e_count, triton.cdiv(i, bi))](
        x, idx, w, gate_up.contiguous(), gate_up_bias if has_bias else gate_up, act,
        H=h, I=i, E=e_count, K=k, S=s, S_PAD=s_pad, HAS_BIAS=has_bias, IEEE=ieee, UPCAST=upcast, BLOCK_I=bi, BLOCK_H=bh,
        num_warps=nw)
    bo, bk, nw = tiles["down"]
    bk //= wide
    kernels.down_kernel[(e_count, triton.cdiv(h, bo), split)](
        act, idx, w, down.contiguous(), down_bias if has_bias else down, y,
        H=h, I=i, E=e_count, S=s, S_PAD=s_pad, HAS_BIAS=has_bias, IEEE=ieee, UPCAST=upcast, BLOCK_HO=bo, BLOCK_I=bk,
        SPLIT=split, num_warps=nw)
    return y[:, :s].view(split, t, k, h).sum(dim=(0, 2)).to(hidden.dtype)


def fused_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """`ExpertsInterface` entry: (T, H), (T, K), (T, K) -> (T, H)."""
    if not supports_fused(self):
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    pairs = top_k_index.numel()
    # float32 tiles take twice the shared memory: the tallest tier (64-128 rows) would not fit.
    if pairs > (SMALL_MAX_PAIRS if self.gate_up_proj.element_size() <= 2 else 32):
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    args = (hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, *_biases(self))
    if hidden_states.device.type == "cuda":
        return fused_experts_triton(*args)
    return fused_experts_reference(*args)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def register_fused() -> str:
    if FUSED not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(FUSED, fused_experts_forward)
    return FUSED


register_fused()
