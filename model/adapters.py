"""Adapters: one small class per MoE family that reads a transformers 5.x sparse MoE block.

Everything the pruning and skipping code needs from a block goes through an adapter:
the router and experts modules, the expert count and top-k, the router's logits, the
routing rule as a pure function of those logits (so that a candidate set of kept
experts can be scored without running the block), one expert's output on given
tokens, the always-on shared part of the block, and in-place removal of experts.

We never copy or patch library code: an expert's output is computed by calling the
library's own experts module with a routing weight of exactly 1, so every family's
expert math (gated or not, biases, clamped activations) stays the library's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn


class MoEError(ValueError):
    """A model or setting this tool cannot work with; reported to the user as one line."""


class UnsupportedModelError(MoEError):
    """The model has no MoE block that any adapter recognises."""


class InvalidExpertCountError(MoEError):
    """The asked number of kept experts is not valid for this block."""


class UnsupportedRoutingError(MoEError):
    """The block's routing does not allow the asked operation."""


@dataclass(frozen=True)
class MoEAdapter:
    """Base adapter for blocks laid out as `block.<router_attr>` + `block.<experts_attr>`.

    Subclasses set the class names and override `_route` (the routing rule) and, where
    the family has them, `shared_output` and the per-expert parameter lists.
    """

    family: str
    module: str  # transformers module that defines the classes
    block_class: str
    router_attr: str = "gate"
    experts_attr: str = "experts"
    # Config keys holding the routed-expert count; all are set to r after pruning.
    count_config_keys: tuple[str, ...] = ("num_local_experts",)
    # Parameters/buffers whose first dimension indexes experts.
    router_per_expert: tuple[str, ...] = ("weight",)
    experts_per_expert: tuple[str, ...] = ("gate_up_proj", "down_proj")

    # ---- discovery -------------------------------------------------------------------
    def block_type(self) -> type | None:
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            return None
        return getattr(mod, self.block_class, None)

    def matches(self, module: nn.Module) -> bool:
        cls = self.block_type()
        return cls is not None and type(module) is cls

    def bind(self, block: nn.Module) -> "BoundMoE":
        """This adapter for one block: the same methods without the block argument."""
        return BoundMoE(self, block)

    # ---- structure -------------------------------------------------------------------
    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_attr)

    def num_experts(self, block: nn.Module) -> int:
        return int(self.experts(block).num_experts)

    def top_k(self, block: nn.Module) -> int:
        return int(self.router(block).top_k)

    def expert_groups(self, block: nn.Module) -> list[list[int]] | None:
        """Expert groups of group-limited routing, or None.

        The library reshapes the experts into `n_group` equal contiguous groups, so a pruned
        block must keep the same number of experts in every group (and keep them in order):
        candidate drop sets take the same number of experts from each group.
        """
        return None

    def min_group_size(self, block: nn.Module) -> int:
        return 1

    def choice_scores(self, block: nn.Module, logits: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Scores whose order decides which experts the router picks first (logits for softmax routers)."""
        return logits

    def chosen_scores(self, block: nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(tokens, k) choice scores of each token's routed experts `indices`: the router's own ranking of
        them (rank 1 = its first choice), which the weights need not follow (DeepSeek-V3's weights omit
        the score-correction bias; PhiMoE's sparsemixer weighs each choice within its own softmax)."""
        return self.choice_scores(block, logits).gather(-1, indices)

    def valid_r(self, block: nn.Module) -> list[int]:
        """Numbers of kept experts this block can be pruned to."""
        n, k = self.num_experts(block), self.top_k(block)
        groups = self.expert_groups(block)
        if groups is None:
            return list(range(k, n + 1))
        n_group, topk_group = len(groups), self.router(block).topk_group
        return [r for r in range(k, n + 1) if r % n_group == 0 and r // n_group >= self.min_group_size(block)
                and (r // n_group) * topk_group >= k]

    def check_r(self, block: nn.Module, r: int) -> None:
        valid = self.valid_r(block)
        if r not in valid:
            e, k = self.num_experts(block), self.top_k(block)
            groups = self.expert_groups(block)
            why = f" in {len(groups)} routing groups (each group keeps r/{len(groups)})" if groups else ""
            raise InvalidExpertCountError(
                f"--r {r} is not valid for {self.family} blocks with {e} experts{why} and top-{k} routing; "
                f"valid values: {_ranges(valid)}"
            )

    # ---- routing -----------------------------------------------------------------------
    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The library router's logits for tokens x (tokens, hidden) -> (tokens, n_experts)."""
        return self.router(block)(x)[0]

    def route(
        self, block: nn.Module, logits: torch.Tensor, kept: torch.Tensor | None = None, balanced: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and expert indices, exactly as the (pruned) block computes them.

        logits: (..., tokens, n_experts) router logits of the unpruned block.
        kept:   None (all experts), (r,) or (candidates, r) sorted original indices of
                kept experts. Dropped experts leave the router (paper Sec. 3.1): the
                rule runs on the kept experts' logits only, which is what the pruned
                block computes.
        balanced: under group-limited routing, whether every candidate keeps the same number of experts in
                each group (the caller knows; None: checked here, which waits for the device).
        Returns weights (..., tokens, top_k) float and indices (..., tokens, top_k) in
        original expert numbering.
        """
        if kept is None:
            return self._route(block, logits, None)
        if self.expert_groups(block) is not None and not (
                self._balanced(block, kept) if balanced is None else balanced):
            w, i = self._route_masked(block, logits, kept if kept.dim() == 2 else kept.unsqueeze(0))
            return (w, i) if kept.dim() == 2 else (w[0], i[0])
        if kept.dim() == 1:
            sub = logits.index_select(-1, kept)
            w, i = self._route(block, sub, kept)
            return w, kept[i]
        # (candidates, r): broadcast logits (tokens, E) -> (candidates, tokens, r)
        c, r = kept.shape
        t = logits.shape[-2]
        idx = kept[:, None, :].expand(c, t, r)
        sub = torch.gather(logits.unsqueeze(0).expand(c, t, logits.shape[-1]), -1, idx)
        w, i = self._route(block, sub, kept)
        return w, torch.gather(idx, -1, i)

    def _route(
        self, block: nn.Module, logits: torch.Tensor, kept: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _balanced(self, block: nn.Module, kept: torch.Tensor) -> bool:
        """Whether every candidate keeps the same number of experts in each routing group."""
        return bool(balanced_rows(self.expert_groups(block), self.num_experts(block), kept).all())

    def _route_masked(self, block: nn.Module, logits: torch.Tensor, kept: torch.Tensor):
        """Group-limited routing for candidates with unequal groups (intermediate beam-search states):
        the rule on the original group layout with the dropped experts removed from the choice.
        For balanced candidates it picks what the pruned block picks."""
        raise NotImplementedError

    def renormalizes(self, block: nn.Module) -> bool:
        """Whether the router rescales the chosen top-k weights to sum to one."""
        return True

    def routed_scaling(self, block: nn.Module) -> float:
        """Factor the router multiplies its chosen weights by, after any renormalisation."""
        return 1.0

    # ---- expert compute ------------------------------------------------------------
    def expert_outputs(self, block: nn.Module, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Unweighted output of expert expert_idx[n] on token x[n]: (n, hidden) -> (n, hidden).

        Calls the library's experts module with top-1 routing and weight exactly 1, so
        the result is the library's own expert computation in the model dtype.
        """
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        return self.experts(block)(x, expert_idx.view(-1, 1), ones)

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the block's always-on part (shared experts) on x (tokens, hidden), or None."""
        return None

    # ---- pruning ---------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, block: nn.Module, kept: list[int]) -> None:
        """Keep only experts `kept` (original indices, sorted) in place."""
        n = self.num_experts(block)
        if sorted(set(kept)) != list(kept) or not kept or kept[-1] >= n or kept[0] < 0:
            raise ValueError(f"kept experts must be sorted unique indices in [0, {n}), got {kept}")
        groups = self.expert_groups(block)
        if groups is not None and len({len(set(g) & set(kept)) for g in groups}) != 1:
            raise ValueError(f"{self.family} routes within {len(groups)} expert groups: every group must keep the "
                             f"same number of experts, got kept={kept}")
        index = torch.tensor(kept, dtype=torch.long)
        for module, names in ((self.router(block), self.router_per_expert), (self.experts(block), self.experts_per_expert)):
            for name in names:
                _slice_first_dim(module, name, index, n)
        self._set_counts(block, len(kept))

    def _set_counts(self, block: nn.Module, r: int) -> None:
        for module in (self.router(block), self.experts(block), block):
            for attr in ("num_experts", "num_local_experts"):
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, r)

    def prune_config(self, config, r: int) -> None:
        for key in self.count_config_keys:
            if hasattr(config, key):
                setattr(config, key, r)


@dataclass(frozen=True)
class BoundMoE:
    """An adapter bound to one MoE block: `moe.route(logits, kept)` is `adapter.route(block, logits, kept)`,
    for every method of `PER_BLOCK`."""

    adapter: MoEAdapter
    block: nn.Module

    PER_BLOCK = ("router", "experts", "num_experts", "top_k", "expert_groups", "min_group_size", "choice_scores",
                 "chosen_scores", "valid_r", "check_r", "router_logits", "route", "renormalizes", "routed_scaling",
                 "expert_outputs", "shared_output", "prune")

    def __getattr__(self, name: str):
        if name not in BoundMoE.PER_BLOCK:
            raise AttributeError(f"{type(self).__name__} has no {name!r} (per-block methods: {BoundMoE.PER_BLOCK})")
        method = getattr(self.adapter, name)
        return lambda *args, **kwargs: method(self.block, *args, **kwargs)


def group_owner(groups: list[list[int]], n_experts: int) -> list[int]:
    """The routing group of each expert."""
    owner = [0] * n_experts
    for g, members in enumerate(groups):
        for e in members:
            owner[e] = g
    return owner


def balanced_rows(groups: list[list[int]], n_experts: int, kept: torch.Tensor) -> torch.Tensor:
    """kept (..., r) expert indices -> (...,) bool: whether the row keeps as many experts in every group."""
    owner = torch.tensor(group_owner(groups, n_experts), device=kept.device)
    counts = torch.nn.functional.one_hot(owner[kept], len(groups)).sum(dim=-2)  # (..., n_group)
    return (counts == counts[..., :1]).all(-1)


def _slice_first_dim(module: nn.Module, name: str, index: torch.Tensor, n: int) -> None:
    t = getattr(module, name)
    if t is None:
        return
    if t.shape[0] != n:
        raise RuntimeError(f"{type(module).__name__}.{name} has shape {tuple(t.shape)}; expected {n} experts first")
    new = t.data.index_select(0, index.to(t.device)).contiguous()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:  # a registered buffer: keep it registered (and its persistence)
        module._buffers[name] = new


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}" if len(values) > 1 else str(values[0])
    return ", ".join(map(str, values))


# ---- routing rules: pure functions of logits along the last dimension ---------------------
# Each replicates a transformers 5.x router's arithmetic op for op, but works on any leading
# dimensions, so that the same rule routes a batch of candidate kept sets at once: logits
# (..., tokens, experts). Tests feed them the library router's own logits: the same experts are
# chosen, and the weights agree to float32 rounding. Not bit for bit across shapes: a pruned
# router's GEMM F.linear(x, W[kept]) can differ from F.linear(x, W)[:, kept] by an ulp on some CPUs.

def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over experts (float32), top-k, optional renormalisation over the k chosen.

    Mixtral's router, and Qwen-MoE's / OLMoE's (with norm_topk_prob). (..., E) -> (..., k).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    w, i = torch.topk(probs, k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, i


def group_mask(group_scores: torch.Tensor, topk_group: int, group_size: int) -> torch.Tensor:
    """(..., n_group) scores -> (..., n_group * group_size) bool mask of the experts in the top groups."""
    idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(-1, idx, 1).bool()
    return mask.unsqueeze(-1).expand(*mask.shape, group_size).reshape(*mask.shape[:-1], -1)


class MixtralAdapter(MoEAdapter):
    def _route(self, block, logits, kept):
        return softmax_topk(logits, self.top_k(block), renormalize=True)


class QwenMoeAdapter(MoEAdapter):
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax, top-k, optional renormalisation (norm_topk_prob),
    weights cast back to the logits' dtype. Qwen2-MoE adds a sigmoid-gated shared expert."""

    def renormalizes(self, block):
        return bool(self.router(block).norm_topk_prob)

    def _route(self, block, logits, kept):
        w, i = softmax_topk(logits, self.top_k(block), renormalize=self.renormalizes(block))
        return w.to(logits.dtype), i

    def shared_output(self, block, x):
        if not hasattr(block, "shared_expert"):
            return None
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


class DeepseekV2Adapter(MoEAdapter):
    """softmax router, greedy or group-limited-greedy top-k (group score = max), routed_scaling_factor,
    shared experts; weights are not renormalised."""

    def renormalizes(self, block):
        return False

    def routed_scaling(self, block):
        return float(self.router(block).routed_scaling_factor)

    def expert_groups(self, block):
        g = self.router(block)
        if g.topk_method != "group_limited_greedy":
            return None
        return _contiguous_groups(self.num_experts(block), g.num_group)

    def _route_masked(self, block, logits, kept):
        keep = _keep_mask(kept, logits.shape[-1])  # (C, 1, E)
        return self._route(block, logits.float().masked_fill(~keep, float("-inf")), None)

    def _route(self, block, logits, kept):
        g = self.router(block)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if g.topk_method == "group_limited_greedy":
            n = scores.shape[-1]
            group_scores = scores.view(*scores.shape[:-1], g.num_group, n // g.num_group).max(dim=-1).values
            scores = scores.masked_fill(~group_mask(group_scores, g.topk_group, n // g.num_group), 0.0)
        w, i = torch.topk(scores, k=g.top_k, dim=-1, sorted=False)
        return w * g.routed_scaling_factor, i

    def shared_output(self, block, x):
        return block.shared_experts(x)


@dataclass(frozen=True)
class DeepseekV3Adapter(MoEAdapter):
    """DeepSeek-V3 and the families that share its router (GLM-4.5 / GLM4-MoE): sigmoid scores plus a
    per-expert score-correction bias for the choice, group-limited top-k (group score = sum of the
    group's top-2), weights from the unbiased scores, optional renormalisation, routed_scaling_factor,
    shared experts."""

    router_per_expert: tuple[str, ...] = ("weight", "e_score_correction_bias")

    def renormalizes(self, block):
        return bool(self.router(block).norm_topk_prob)

    def routed_scaling(self, block):
        return float(self.router(block).routed_scaling_factor)

    def expert_groups(self, block):
        g = self.router(block)
        return _contiguous_groups(self.num_experts(block), g.num_group) if g.num_group > 1 else None

    def min_group_size(self, block):
        return 2  # the group score takes each group's top-2

    def choice_scores(self, block, logits, kept=None):
        bias = self.router(block).e_score_correction_bias
        if kept is not None:
            bias = bias[kept].unsqueeze(-2) if kept.dim() == 2 else bias[kept]
        return logits.float().sigmoid() + bias

    def _route_masked(self, block, logits, kept):
        keep = _keep_mask(kept, logits.shape[-1])  # (C, 1, E)
        scores = logits.float().sigmoid().expand(kept.shape[0], *logits.shape)
        return self._rule(block, scores, self.choice_scores(block, logits).masked_fill(~keep, float("-inf")))

    def _route(self, block, logits, kept):
        return self._rule(block, logits.float().sigmoid(), self.choice_scores(block, logits, kept))

    def _rule(self, block, scores, choice):
        g = self.router(block)
        n = scores.shape[-1]
        group_scores = choice.view(*choice.shape[:-1], g.num_group, n // g.num_group).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~group_mask(group_scores, g.topk_group, n // g.num_group), float("-inf"))
        i = torch.topk(choice, k=g.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(-1, i)
        if g.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * g.routed_scaling_factor, i

    def shared_output(self, block, x):
        return block.shared_experts(x)


class PhimoeAdapter(MoEAdapter):
    """PhiMoE: the sparsemixer router (top-2; each weight a softmax over the logits within a relative
    threshold of that choice). Routing calls the library's own `sparsemixer` in eval mode."""

    def renormalizes(self, block):
        return False

    def _route(self, block, logits, kept):
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        g = self.router(block)
        return sparsemixer(logits, jitter_eps=g.router_jitter_noise, training=False, top_k=g.top_k)

    def _set_counts(self, block, r):
        super()._set_counts(block, r)
        self.router(block).out_features = r  # the router is an nn.Linear


@dataclass(frozen=True)
class GptOssAdapter(MoEAdapter):
    """GPT-OSS: router with a bias, top-k on logits, softmax over the k chosen; experts with biases."""

    router_per_expert: tuple[str, ...] = ("weight", "bias")
    experts_per_expert: tuple[str, ...] = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    def _route(self, block, logits, kept):
        v, i = torch.topk(logits, self.top_k(block), dim=-1)
        return torch.softmax(v, dim=-1, dtype=v.dtype), i


def _keep_mask(kept: torch.Tensor, n: int) -> torch.Tensor:
    """(C, r) kept experts -> (C, 1, n) bool, broadcastable over tokens."""
    return torch.zeros(kept.shape[0], n, dtype=torch.bool, device=kept.device).scatter_(1, kept, True).unsqueeze(1)


def _contiguous_groups(n: int, n_group: int) -> list[list[int]]:
    size = n // n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(n_group)]


def _mod(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


# Registry: family name -> adapter. A new family is one more entry.
ADAPTERS: dict[str, MoEAdapter] = {a.family: a for a in (
    MixtralAdapter("mixtral", _mod("mixtral"), "MixtralSparseMoeBlock"),
    QwenMoeAdapter("qwen2_moe", _mod("qwen2_moe"), "Qwen2MoeSparseMoeBlock", count_config_keys=("num_experts",)),
    QwenMoeAdapter("qwen3_moe", _mod("qwen3_moe"), "Qwen3MoeSparseMoeBlock", count_config_keys=("num_experts",)),
    QwenMoeAdapter("olmoe", _mod("olmoe"), "OlmoeSparseMoeBlock", count_config_keys=("num_experts",)),
    DeepseekV2Adapter("deepseek_v2", _mod("deepseek_v2"), "DeepseekV2Moe", count_config_keys=("n_routed_experts",)),
    DeepseekV3Adapter("deepseek_v3", _mod("deepseek_v3"), "DeepseekV3MoE", count_config_keys=("n_routed_experts",)),
    DeepseekV3Adapter("glm4_moe", _mod("glm4_moe"), "Glm4MoeMoE", count_config_keys=("n_routed_experts",)),
    PhimoeAdapter("phimoe", _mod("phimoe"), "PhimoeSparseMoeBlock", router_attr="router"),
    GptOssAdapter("gpt_oss", _mod("gpt_oss"), "GptOssMLP", router_attr="router"),
)}


def supported_families() -> str:
    return ", ".join(sorted(ADAPTERS))


def adapter_for(module: nn.Module) -> MoEAdapter | None:
    for adapter in ADAPTERS.values():
        if adapter.matches(module):
            return adapter
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (model.model.layers for every family we support)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layer list; supported MoE families: {supported_families()}"
        )
    return layers


def find_moe_blocks(model: nn.Module) -> dict[int, tuple[MoEAdapter, nn.Module]]:
    """{decoder-layer index: (adapter, block)} for every layer that holds a supported MoE block."""
    found: dict[int, tuple[MoEAdapter, nn.Module]] = {}
    for idx, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            adapter = adapter_for(module)
            if adapter is not None:
                found[idx] = (adapter, module)
                break
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', '?')!r}) has no MoE layer this tool "
            f"can read; supported MoE families: {supported_families()}"
        )
    return found
