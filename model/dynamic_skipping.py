"""Dynamic skipping at inference (paper Sec. 3.2), without touching installed files.

The betas come from calibration (`--method dynamic_skipping`, method/skip_calibration.py); this
module applies them: the rule (`skip_rule`), the weights it leaves (`weights_after_skip`), and the
hooks that put both into a loaded model (`DynamicSkipping`).

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

import json
import math
from contextlib import contextmanager

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .adapters import BoundMoE, UnsupportedRoutingError, find_moe_blocks

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
    """`skip_rule` + `weights_after_skip` + sentinel indices + counters, in one Triton kernel.

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


def weights_after_skip(weights: torch.Tensor, skip: torch.Tensor, renormalize: bool, scale: float) -> torch.Tensor:
    """Routing weights (tokens, k) once the `skip` slots (tokens, k) are removed from each token's top-k.

    The result is what the family's router gives when it routes the token to the remaining experts
    only: a renormalising router (`MoEAdapter.renormalizes`) gives them its whole total again, one
    times `scale` (`MoEAdapter.routed_scaling`; the paper's skipping block: w1 -> 1 for Mixtral;
    DeepSeek-V3 and GLM4-MoE with norm_topk_prob: w1 -> routed_scaling_factor); a router that does
    not renormalise just loses the skipped weights. Rows without a skip are returned untouched.
    """
    w = weights.masked_fill(skip, 0.0)
    if renormalize:
        renormalised = w / w.sum(dim=-1, keepdim=True) * scale
        w = torch.where(skip.any(dim=-1, keepdim=True), renormalised.to(weights.dtype), weights)
    return w


class BetasError(ValueError):
    """`betas` that are not one finite threshold >= 0 per skippable rank of every MoE layer."""


def _is_threshold(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _shown(value) -> str:
    """The value as config.json spells it (NaN, Infinity, null, true, "text")."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _needs(layer: str, k: int | None) -> str:
    if k is None:
        return "expected a finite number >= 0 (a list of k - 1 of them for a top-k layer, k > 2)"
    if k == 2:
        return f"layer {layer} routes to top-2, so it needs one threshold: a finite number >= 0"
    return (f"layer {layer} routes to top-{k}, so it needs {k - 1} thresholds (ranks 2..{k}): "
            f"a list of {k - 1} finite numbers >= 0")


def check_betas(betas, top_k: dict[int, int] | None = None) -> dict[int, list[float]]:
    """Validate `betas` ({"<MoE layer index>": threshold(s)}); returns {layer: [beta_2, ..., beta_k]}.

    A top-2 layer takes one number (the paper's and the original code's format), a top-k layer a
    list of k - 1 (ranks 2..k); each is finite and >= 0 (0 never skips, above 1 always skips).
    With `top_k` ({layer: k} of every MoE layer) the entries must match those layers exactly;
    without it (no model yet) only their form is checked. Raises BetasError naming the layer
    and the bad value.
    """
    if not isinstance(betas, dict) or not betas:
        raise BetasError(f"`betas` is {_shown(betas)}: expected a JSON object {{\"<MoE layer index>\": beta}} "
                         "with an entry for every MoE layer")
    out: dict[int, list[float]] = {}
    for key, value in betas.items():
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            layer = key
        elif isinstance(key, str) and key.isdigit():
            layer = int(key)
        else:
            raise BetasError(f"`betas` key {_shown(key)} is not a layer index (expected \"0\", \"1\", ...)")
        if top_k is not None and layer not in top_k:
            raise BetasError(f"`betas` has an entry for layer {key}, which is not a MoE layer "
                             f"(MoE layers: {', '.join(map(str, sorted(top_k)))})")
        k = None if top_k is None else top_k[layer]
        is_list = isinstance(value, (list, tuple))
        if k == 2 or (k is None and not is_list):
            values = [value]
        elif is_list and value and (k is None or len(value) == k - 1):
            values = list(value)
        else:
            values = [None]  # the wrong form for this layer: reported below
        if not all(map(_is_threshold, values)):
            raise BetasError(f"`betas` entry of layer {key} is {_shown(value)}: {_needs(str(key), k)}")
        out[layer] = [float(v) for v in values]
    missing = sorted(set(top_k or ()) - set(out))
    if missing:
        raise BetasError(f"`betas` has no entry for MoE layer {missing[0]} (has {', '.join(map(str, sorted(out)))}); "
                         "recalibrate with `python main.py --method dynamic_skipping`")
    return out


class DynamicSkipping:
    """Owner of the router hooks and experts-implementation switch that make a model skip."""

    def __init__(self, model: nn.Module, betas: dict | None = None):
        """betas: {"<MoE layer>": threshold(s)} (see `check_betas`); default: the model config's `betas`.

        Everything is checked here, before any hook exists: on a meta-device skeleton this
        validates a checkpoint's betas without reading its weights (`model.loading` does so).
        """
        self.model = model
        if betas is None:
            if not hasattr(model.config, "betas"):
                raise ValueError("this model has no `betas` in its config: run `python main.py --method "
                                 "dynamic_skipping` on it first, or pass betas")
            betas = model.config.betas
        self.blocks = find_moe_blocks(model)
        top_k = {}
        for idx, (adapter, block) in self.blocks.items():
            top_k[idx] = adapter.top_k(block)
            if top_k[idx] < 2:
                raise UnsupportedRoutingError(f"layer {idx} routes each token to one expert: nothing to skip")
        # (k - 1,) thresholds for ranks 2..k of each MoE layer
        self.betas: dict[int, torch.Tensor] = {idx: torch.tensor(v, dtype=torch.float32)
                                               for idx, v in check_betas(betas, top_k).items()}
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
                moe = adapter.bind(block)
                self._handles.append(moe.router().register_forward_hook(self._router_hook(idx, moe)))
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
    def _router_hook(self, idx: int, moe: BoundMoE):
        n_experts = moe.num_experts()
        renormalize, scale = moe.renormalizes(), moe.routed_scaling()  # constants of the block: not per call

        def hook(_router, _args, output):
            logits, weights, indices = output
            key = (idx, weights.device)
            if key not in self._device_betas:
                self._device_betas[key] = self.betas[idx].to(weights.device)
            counts = self._counts(idx, weights.device)  # (2,) int64: routed tokens, skipped slots
            scores = moe.chosen_scores(logits, indices)
            if _use_skip_kernel(weights.device):
                # One launch instead of ~15 small ops per layer and step (they dominate a graph-captured decode step).
                new_weights, new_indices = skip_kernel(weights, scores, indices, self._device_betas[key], n_experts,
                                                       renormalize, scale, counts)
                return logits, new_weights, new_indices
            skip = skip_rule(weights, scores, self._device_betas[key])
            new_weights = weights_after_skip(weights, skip, renormalize, scale)
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
        # Zeroed in place: a captured CUDA graph keeps incrementing the same tensors. Counters first
        # used under inference mode (StaticDecoder.generate) are inference tensors: zero them in it.
        with torch.inference_mode():
            for c in self._device_counts.values():
                c.zero_()

    @contextmanager
    def uncounted(self):
        """Forward passes inside this block skip as usual but leave the counters as they were."""
        saved = {key: c.clone() for key, c in self._device_counts.items()}
        try:
            yield self
        finally:
            for key, c in self._device_counts.items():
                if key in saved:
                    c.copy_(saved[key])
                else:  # first used inside the block
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
