"""Dynamic skipping at inference (paper Sec. 3.2), without touching installed files.

Two of transformers' own extension points do the work:

1. A forward hook on each MoE layer's router applies the paper's rule to the router's
   output: a token skips its 2nd expert when w2 < beta * w1 (for top-k routers, its j-th
   expert when w_j < beta_j * w1, j = 2..k; betas are then lists), ranks being the router's
   own order of choice. The skipped slot gets the expert-parallel sentinel index
   (== num_experts, "no expert") and weight 0, and the remaining weights become what the
   family's router gives when it routes the token to the remaining experts only (a
   renormalising router's whole total, routed_scaling_factor included: Mixtral w1 -> 1, as
   the paper's skipping block computes).
2. An experts implementation registered in `ExpertsInterface` ("skip+<base>", e.g.
   "skip+eager") drops the sentinel slots before calling the base implementation, so a
   skipped expert never sees the token: tokens are grouped by their number of active
   experts and each group goes through the base kernel with that top-k. transformers'
   grouped_mm already leaves sentinel slots out of its GEMMs (its expert-parallel
   support), so "skip+grouped_mm" hands them to it unchanged.

`DynamicSkipping` owns the hooks and the implementation switch: `enable()` / `disable()`
(or use it as a context manager) and `stats()` for skip rates.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .adapters import MoEAdapter, UnsupportedRoutingError, find_moe_blocks

SKIP_PREFIX = "skip+"


def _base_forward(module: nn.Module, base: str):
    if base == "eager":
        # The class's own forward, as `use_experts_implementation` wrapped it.
        return type(module).forward.__wrapped__
    return ALL_EXPERTS_FUNCTIONS[base]


# Implementations that already leave sentinel slots out of the GEMMs (transformers' expert-parallel
# support): skipped slots pass straight through, with no host sync and no regrouping.
_SENTINEL_AWARE = ("grouped_mm", "fused")


def _make_skipping_experts_forward(base: str):
    if base in _SENTINEL_AWARE:
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return ALL_EXPERTS_FUNCTIONS[base](self, hidden_states, top_k_index, top_k_weights)

        forward.__name__ = f"skipping_{base}_experts_forward"
        return forward

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        run = _base_forward(self, base)
        active = top_k_index < self.num_experts  # (tokens, k); sentinel slots are skipped
        n_active = active.sum(dim=-1)  # (tokens,)
        k = top_k_index.shape[-1]
        if bool((n_active == k).all()):
            return run(self, hidden_states, top_k_index, top_k_weights)
        out = torch.empty_like(hidden_states)
        # Active slots first, in their original order (stable sort of "is skipped").
        order = torch.sort((~active).to(torch.int8), dim=-1, stable=True).indices
        idx = torch.gather(top_k_index, -1, order)
        w = torch.gather(top_k_weights, -1, order)
        for c in torch.unique(n_active).tolist():
            rows = (n_active == c).nonzero(as_tuple=True)[0]
            if c == 0:
                out[rows] = 0
                continue
            out[rows] = run(self, hidden_states[rows], idx[rows, :c].contiguous(), w[rows, :c].contiguous()).to(
                out.dtype)
        return out

    forward.__name__ = f"skipping_{base}_experts_forward"
    return forward


def register_skipping_implementation(base: str) -> str:
    """Register "skip+<base>" in transformers' ExpertsInterface; returns the name."""
    name = SKIP_PREFIX + base
    if name not in ALL_EXPERTS_FUNCTIONS:
        if base != "eager" and base not in ALL_EXPERTS_FUNCTIONS:
            raise ValueError(f"unknown experts implementation {base!r}")
        ExpertsInterface.register(name, _make_skipping_experts_forward(base))
    return name


def _use_skip_kernel(device: torch.device) -> bool:
    from .fused_experts import triton_available

    return device.type == "cuda" and triton_available()


def skip_kernel(weights: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, betas: torch.Tensor,
                n_experts: int, renormalize: bool, scale: float,
                counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`skip_rule` + `MoEAdapter.weights_after_skip` + sentinel indices + counters, in one Triton kernel.

    weights, scores, indices: (tokens, k); betas: (k - 1,) float32; scale: the renormalised total
    (routed_scaling_factor); counts: (2,) int64, incremented in place.
    """
    import triton

    from .kernels import skip_kernel as kernel

    t, k = weights.shape
    w_out, i_out = torch.empty_like(weights), torch.empty_like(indices)
    block_t = 64
    kernel[(triton.cdiv(t, block_t),)](weights.contiguous(), scores.contiguous(), indices.contiguous(), betas, w_out,
                                      i_out, counts, t, float(scale), K=k, K_PAD=triton.next_power_of_2(k), E=n_experts, RENORM=renormalize,
                                      BLOCK_T=block_t)
    return w_out, i_out


def skip_rule(weights: torch.Tensor, scores: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Which routed slots to skip: slot j of rank >= 2 when w_j < beta_j * w_1.

    weights: (tokens, k) routing weights; scores: (tokens, k) the router's choice scores of the
    same slots (`MoEAdapter.chosen_scores`), which rank them: w_1 is the weight of the router's
    first choice, not necessarily the largest weight. betas: (k - 1,) thresholds for ranks 2..k.
    For top-2 this is the paper's rule w2 < beta * w1. Returns a (tokens, k) bool mask.
    """
    first = scores.argmax(dim=-1, keepdim=True)
    w1 = weights.gather(-1, first)
    if weights.shape[-1] == 2:  # few kernels: this runs in every MoE layer at every decoding step
        second = 1 - first
        w2 = weights.gather(-1, second)
        return torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, second, w2 < betas * w1)
    ranks = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = first choice
    thresholds = torch.cat([betas.new_full((1,), float("-inf")), betas]).to(weights.dtype)[ranks]
    return weights < thresholds * w1


class DynamicSkipping:
    """Owner of the router hooks and experts-implementation switch that make a model skip."""

    def __init__(self, model: nn.Module, betas: dict | None = None):
        self.model = model
        betas = betas if betas is not None else getattr(model.config, "betas", None)
        if not betas:
            raise ValueError("this model has no `betas` in its config: run `python main.py --method dynamic_skipping` "
                             "on it first, or pass betas")
        self.blocks = find_moe_blocks(model)
        self.betas: dict[int, torch.Tensor] = {}
        for idx, (adapter, block) in self.blocks.items():
            k = adapter.top_k(block)
            if k < 2:
                raise UnsupportedRoutingError(f"layer {idx} routes each token to one expert: nothing to skip")
            if str(idx) not in betas:
                raise ValueError(f"`betas` has no entry for MoE layer {idx} (has {sorted(betas, key=int)})")
            value = betas[str(idx)]
            value = [value] if isinstance(value, (int, float)) else list(value)
            if len(value) != k - 1:
                raise ValueError(f"layer {idx} routes to top-{k}: its `betas` entry needs {k - 1} thresholds "
                                 f"(ranks 2..{k}), got {len(value)}; recalibrate with --method dynamic_skipping")
            self.betas[idx] = torch.tensor([float(v) for v in value], dtype=torch.float32)
        self._device_betas: dict = {}  # (layer, device) -> betas there: no host-to-device copy per step
        self._device_counts: dict = {}  # (layer, device) -> tensor([tokens, skipped]), updated on the device
        self._handles: list = []
        self._base: str | None = None

    # ---- switching ---------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def enable(self) -> "DynamicSkipping":
        if self.enabled:
            return self
        base = self.model.config._experts_implementation or "eager"
        if base.startswith(SKIP_PREFIX):
            base = base[len(SKIP_PREFIX):]
        self.model.set_experts_implementation(register_skipping_implementation(base))
        self._base = base
        try:
            for idx, (adapter, block) in self.blocks.items():
                self._handles.append(adapter.router(block).register_forward_hook(self._router_hook(idx, adapter, block)))
        except Exception:
            self.disable()
            raise
        return self

    def disable(self) -> "DynamicSkipping":
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._base is not None:
            self.model.set_experts_implementation(self._base)
            self._base = None
        return self

    def __enter__(self):
        return self.enable()

    def __exit__(self, *exc):
        self.disable()

    # ---- the rule ------------------------------------------------------------------------
    def _router_hook(self, idx: int, adapter: MoEAdapter, block: nn.Module):
        n_experts = adapter.num_experts(block)

        def hook(_router, _args, output):
            logits, weights, indices = output
            key = (idx, weights.device)
            if key not in self._device_betas:
                self._device_betas[key] = self.betas[idx].to(weights.device)
            counts = self._counts(idx, weights.device)  # (2,) int64: routed tokens, skipped slots
            scores = adapter.chosen_scores(block, logits, indices)
            if _use_skip_kernel(weights.device):
                # One launch instead of ~15 small ops per layer and step (they dominate a graph-captured decode step).
                new_weights, new_indices = skip_kernel(weights, scores, indices, self._device_betas[key], n_experts,
                                                       adapter.renormalizes(block), adapter.routed_scaling(block),
                                                       counts)
                return logits, new_weights, new_indices
            skip = skip_rule(weights, scores, self._device_betas[key])
            new_weights = adapter.weights_after_skip(block, weights, skip)
            new_indices = indices.masked_fill(skip, n_experts)
            counts[0] += skip.shape[0]  # in place: stays correct when the step is replayed from a CUDA graph
            counts[1] += skip.sum()
            return logits, new_weights, new_indices

        return hook

    def _counts(self, idx: int, device: torch.device) -> torch.Tensor:
        key = (idx, device)
        if key not in self._device_counts:
            self._device_counts[key] = torch.zeros(2, dtype=torch.long, device=device)
        return self._device_counts[key]

    # ---- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        # Zeroed in place: a captured CUDA graph keeps incrementing the same tensors.
        for c in self._device_counts.values():
            c.zero_()

    def stats(self) -> dict:
        """Skipped (token, expert) slots over routed tokens, per MoE layer and overall.

        For top-2 routers this is the fraction of tokens that skipped their 2nd expert.
        """
        totals = {idx: [0, 0] for idx in self.blocks}
        for (idx, _device), c in self._device_counts.items():
            t, s = c.tolist()
            totals[idx][0] += t
            totals[idx][1] += s
        layers = {}
        for idx, (t, s) in totals.items():
            layers[str(idx)] = {"tokens": t, "skipped": s, "skip_rate": s / t if t else 0.0}
        tokens = sum(v["tokens"] for v in layers.values())
        skipped = sum(v["skipped"] for v in layers.values())
        return {"layers": layers, "tokens": tokens, "skipped": skipped,
                "skip_rate": skipped / tokens if tokens else 0.0}
