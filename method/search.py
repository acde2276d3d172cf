"""The pruning objective and exact search over expert subsets (paper Sec. 3.1, Eq. 3-4).

For a MoE layer with input tokens x and original output Z, dropping the expert set D
gives the output Z_D of the block whose router no longer sees D (the softmax/top-k run
over the kept experts only). The loss of D is

    L(D) = sum over calibration batches b of || Z_b - Z_D,b ||_F          (float64)

and the kept set is the complement of argmin_D L(D), ties going to the first D in
`itertools.combinations` order, as the paper's enumeration.

Instead of one full MoE forward per candidate D (the original code), each expert's output
y_e(x_t) is computed once for the (token, expert) pairs that some candidate can route to,
and every candidate is scored from per-token inner products:

    || Z_t - sum_k w_k y_k ||^2 = <Z,Z> - 2 sum_k w_k <Z, y_k> + sum_{k,l} w_k w_l <y_k, y_l>

so scoring one candidate costs O(tokens * top_k^2) instead of a block forward.

The target Z. With the original model's MoE input (layer-wise pruning, and progressive pruning
until its first pruned layer), Z is the float64 sum over each token's original routing of the
same computed expert outputs, Z_t = sum_k w_k y_k (`add_batch(x)`): the block's own output in
float64, without its rounding to the model dtype. A token whose routing a candidate leaves
unchanged then contributes 0, as in the paper's enumeration, where Z and Z_D come out of the same
kernels; against the bf16-rounded Z it would contribute that rounding (~2^-9 |Z_t|) for every
candidate, a noise floor the paper's objective does not have. Once progressive pruning has
pruned a layer, the MoE input is the pruned model's and no routing of it reproduces the
original model's output: Z is then that output, as in the paper (`add_batch(x, target)`).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from model.adapters import balanced_rows, group_owner
from model.profiling import phase

logger = logging.getLogger(__name__)

# Work sizes: bound memory whatever the model and calibration size. On a GPU they are larger, so that each
# kernel has enough work for the Python that launches it (the beam search's scoring passes launch a few dozen
# kernels per candidate chunk) and the experts' GEMMs see enough tokens per expert; they change no result but
# the order in which float64 sums over token chunks are added.
_BYTES_PER_CHUNK = {"cpu": 1 << 30, "cuda": 1 << 32}  # expert outputs of one token chunk, at 8 bytes per value
_ROUTE_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}  # candidates x tokens x experts routed at once


def _work_size(sizes: dict, device: torch.device) -> int:
    return sizes.get(device.type, sizes["cpu"])


def drop_sets(n_experts: int, r: int, groups: list[list[int]] | None = None) -> list[tuple[int, ...]]:
    """Every set of n_experts - r dropped experts, in itertools.combinations order.

    With routing groups, every group drops the same number of experts (see
    `MoEAdapter.expert_groups`): the product of per-group combinations, in product order.
    """
    if groups is None:
        return list(itertools.combinations(range(n_experts), n_experts - r))
    per_group = (n_experts - r) // len(groups)
    return [tuple(sorted(itertools.chain(*p)))
            for p in itertools.product(*(itertools.combinations(g, per_group) for g in groups))]


def count_drop_sets(n_experts: int, r: int, groups: list[list[int]] | None = None) -> int:
    if groups is None:
        return math.comb(n_experts, n_experts - r)
    per_group = (n_experts - r) // len(groups)
    return math.prod(math.comb(len(g), per_group) for g in groups)


def kept_tensor(n_experts: int, drops: list[tuple[int, ...]], device=None) -> torch.Tensor:
    """(candidates, r) sorted kept experts for each drop set."""
    rows = [[e for e in range(n_experts) if e not in set(d)] for d in drops]
    return torch.tensor(rows, dtype=torch.long, device=device).view(len(drops), -1)


def drop_key(drop: tuple[int, ...]) -> str:
    """JSON key of a drop set, e.g. (0, 3) -> "0,3"."""
    return ",".join(map(str, drop))


@dataclass
class TokenStats:
    """Inner products for a set of tokens: what scoring a candidate routing needs, per token.

    slot:  (T, E) int16, position of expert e in token t's computed set, -1 if not computed
    gram:  (T, M(M+1)/2) <y_m, y_n> between the computed experts' outputs of each token, m <= n, packed row by
           row (`packed_index`); float32 for bfloat16/float16 models (exactly the float32 products
           `token_stats` computes), float64 for float32 models
    cross: (T, M) float64 <target, y_m>
    z2:    (T,) float64 <target, target>
    orig_slot, orig_weight: (T, k) the original routing (int16 slots, weights as the router gives them)
           when the target is its output, else None
    n_slots: M
    """

    slot: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    z2: torch.Tensor
    orig_slot: torch.Tensor | None = None
    orig_weight: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        return self.cross.shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def to(self, device, non_blocking: bool = False, pin_memory: bool = False) -> "TokenStats":
        """A copy on `device` (into page-locked host memory with pin_memory)."""
        def move(t):
            if pin_memory:
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=non_blocking)
            return t.to(device, non_blocking=non_blocking)
        return TokenStats(**{k: move(v) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


def gram_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the Gram matrices are computed and stored in (see `token_stats`)."""
    return torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else torch.float64


def stats_bytes_per_token(n_experts: int, n_slots: int, top_k: int, model_dtype: torch.dtype,
                          logits_dtype: torch.dtype, original_routing: bool = True,
                          weights_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the beam search's statistics per calibration token (`BeamSearch`): with E experts, M computed
    slots per token (n_drop + top_k without routing groups, n_group * min(group size, n_drop / n_group + top_k)
    with them, plus the rare router ties), g = 4 for bfloat16/float16 models (8 for float32), l the router
    logits' element size and w the routing weights' (4: float32 for most routers; Qwen-MoE's are in the model
    dtype):

        M (M + 1) / 2 * g     Gram matrix, upper triangle
      + 8 M + 8               <target, y_m> and <target, target>, float64
      + 2 E                   slot of each expert, int16
      + l E                   router logits
      + k (2 + w)             the original routing (int16 slots, weights), when it is the target

    E.g. DeepSeek-V3 (E = 256, top-8, 8 groups, float32 router logits) at r = 128: M = 192, 77.2 kB per token,
    20.2 GB at 128 x 2048 tokens (78.5 GB with the full float64 Gram matrices and int64 slots this replaced);
    Qwen3-235B-A22B (E = 128, top-8, bfloat16 logits and weights) at r = 64: M = 72, 11.6 kB per token, 3.05 GB.
    """
    def size(dtype):
        return torch.empty(0, dtype=dtype).element_size()

    m = n_slots
    return (m * (m + 1) // 2 * size(gram_dtype(model_dtype)) + 8 * m + 8 + 2 * n_experts
            + size(logits_dtype) * n_experts + (top_k * (2 + size(weights_dtype)) if original_routing else 0))


def packed_index(a: torch.Tensor, b: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Position of Gram entry (a, b) in the packed upper triangle of an M x M symmetric matrix (row-major,
    `torch.triu_indices` order): rows before min(a, b) hold M, M - 1, ... entries."""
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    return lo * n_slots - lo * (lo - 1) // 2 + (hi - lo)


def slots_from_mask(needed: torch.Tensor) -> torch.Tensor:
    """(T, E) bool -> (T, E) long: rank of each needed expert within its token's row, -1 elsewhere."""
    pos = needed.long().cumsum(dim=-1) - 1
    return torch.where(needed, pos, torch.full_like(pos, -1))


@contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def slot_outputs(y: torch.Tensor, token_idx: torch.Tensor, slot_idx: torch.Tensor, n_tokens: int,
                 n_slots: int) -> torch.Tensor:
    """(T, M, H) expert outputs by token and slot (zeros where a token has fewer computed experts), exactly the
    values of y in `gram_dtype`."""
    ys = torch.zeros(n_tokens, n_slots, y.shape[-1], dtype=gram_dtype(y.dtype), device=y.device)
    ys[token_idx, slot_idx] = y.to(ys.dtype)
    return ys


def routed_output(ys: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """(T, H) float64 sum_k w_k y_k of the routing (weights, expert indices), each (T, k), from the slot outputs
    `ys`; None if it uses an expert without one."""
    s = slot.gather(1, idx)  # (T, k)
    if bool((s < 0).any()):
        return None
    rows = torch.arange(ys.shape[0], device=ys.device).unsqueeze(-1)
    return (weight.to(torch.float64).unsqueeze(-1) * ys[rows, s].to(torch.float64)).sum(1)


def token_stats(y: torch.Tensor, token_idx: torch.Tensor, slot_idx: torch.Tensor, n_tokens: int,
                n_slots: int, target: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                slot: torch.Tensor, combine: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[TokenStats, torch.Tensor | None]:
    """Inner products of expert outputs and target.

    y:          (N, H) output of expert pair n on its token, in the model dtype
    token_idx:  (N,) token of pair n; slot_idx: (N,) its slot
    target:     (T, H) float64 target of the routed experts, or the original routing
                (weights, expert indices), each (T, k), whose output over these same y is the target
    combine:    a routing (weights, expert indices), each (T, k), whose output sum_k w_k y_k is returned too
                (float64), or None if one of its experts' outputs is not among y

    The Gram matrix (the T * M^2 * H part) is computed in float64 for float32 models. For
    bfloat16/float16 models it is computed in float32 with TF32 on GPUs: the outputs have
    at most 10 mantissa bits, so TF32 products are exact and only the float32 accumulation
    rounds (~1e-6 relative, below the model dtype's own rounding); the rest is float64.
    """
    half = y.dtype in (torch.bfloat16, torch.float16)
    ys = slot_outputs(y, token_idx, slot_idx, n_tokens, n_slots)
    with _tf32(half):
        gram = ys @ ys.transpose(1, 2)  # (T, M, M)
    rows = torch.arange(n_tokens, device=gram.device).unsqueeze(-1)
    out = None if combine is None else routed_output(ys, slot, *combine)
    iu = torch.triu_indices(n_slots, n_slots, device=gram.device)
    packed = gram[:, iu[0], iu[1]]
    if isinstance(target, tuple):  # target = sum_k w_k y_k: its inner products are sums of Gram entries
        weight, idx = target
        orig_slot = slot.gather(1, idx)  # (T, k)
        if bool((orig_slot < 0).any()):
            raise RuntimeError("the original routing uses an expert whose output was not computed")
        w = weight.to(torch.float64)
        cross = torch.einsum("tk,tkm->tm", w, gram[rows, orig_slot].to(torch.float64))  # (T, M)
        z2 = (w * cross.gather(1, orig_slot)).sum(-1)  # (T,)
        return TokenStats(slot=slot.to(torch.int16), gram=packed, cross=cross, z2=z2,
                          orig_slot=orig_slot.to(torch.int16), orig_weight=weight), out
    ys = ys.to(torch.float64)
    cross = (ys @ target.unsqueeze(-1)).squeeze(-1)  # (T, M)
    z2 = (target * target).sum(-1)  # (T,)
    return TokenStats(slot=slot.to(torch.int16), gram=packed, cross=cross, z2=z2), out


def sq_errors(stats: TokenStats, weights: torch.Tensor, indices: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||target_t - sum_k w_k y_k||^2 for each candidate routing.

    weights, indices: (C, T, k) routing of C candidates on the T tokens of `stats`.
    missing: a bool device scalar, set when a candidate routes a token to an expert whose output was not
    computed (the caller checks it once, not per call: a check here would wait for the GPU every call).
    Returns (C,) float64.
    """
    c, t, k = indices.shape
    rows = torch.arange(t, device=indices.device).view(1, t, 1)
    s = stats.slot[rows, indices].long()  # (C, T, k)
    missing |= (s < 0).any()
    s = s.clamp_min(0)
    w = weights.to(torch.float64)
    cross = stats.cross[rows, s]  # (C, T, k)
    gram = stats.gram[rows.unsqueeze(-1), packed_index(s.unsqueeze(-1), s.unsqueeze(-2), stats.n_slots)]
    err = stats.z2 - 2.0 * (w * cross).sum(-1) + torch.einsum("ctk,ctkl,ctl->ct", w, gram.to(torch.float64), w)
    if stats.orig_slot is not None:
        # The candidate routes the token as the original block did: its output is the target exactly
        # (the expansion above would leave float64 rounding of |Z_t|^2).
        same = ((s == stats.orig_slot) & (weights == stats.orig_weight)).all(-1)  # (C, T)
        err = err.masked_fill(same, 0.0)
    # Rounding can push an exact-zero error a hair below zero; a squared norm is >= 0.
    return err.clamp_min(0.0).sum(-1)


def argmin_first(losses: list[float]) -> int:
    """Index of the smallest loss, the first one on ties."""
    return min(range(len(losses)), key=lambda i: (losses[i], i))


def rank_bound_mask(scores: torch.Tensor, n_drop: int, k: int, groups: list[list[int]] | None) -> torch.Tensor:
    """(T, E) bool: the experts some candidate dropping n_drop experts can route each token to.

    The router picks by `scores` order. Expert e is picked only if fewer than k kept experts
    rank above it, so at least rank(e) - k + 1 of those must be dropped: with n_drop drops,
    only the top m = n_drop + k experts of each token can ever be picked. Under group-limited
    routing every group drops n_drop / n_group experts and e competes with its own group's
    experts, so the bound applies within each group.

    Ties: every expert whose score ties with the m-th best is in the mask, since the router may
    break the tie either way (bf16 logits tie for a few % of tokens). "Ties" include scores within
    the rounding of the router's own arithmetic: softmax routers rank float32 probabilities
    exp(l - max) / sum over the kept experts, which can round two logits a few float32 ulps of the
    token's largest |logit| apart to the same value. A token can therefore get more than m experts;
    callers size their work from the mask's real count.
    """
    t, n = scores.shape
    mask = torch.zeros(t, n, dtype=torch.bool, device=scores.device)
    for members in (groups or [list(range(n))]):
        cols = torch.tensor(members, device=scores.device)
        sub = scores[:, cols].float()  # (T, members)
        m = min(len(members), (n_drop // (len(groups) if groups else 1)) + k)
        mth = torch.topk(sub, m, dim=-1).values[:, -1:]  # (T, 1) m-th best score
        slack = 16 * torch.finfo(torch.float32).eps * (sub.abs().amax(dim=-1, keepdim=True) + 1)
        mask[:, cols] = sub >= mth - slack
    return mask


class _LayerSearch:
    """Shared part of the searches: per-batch targets, logits and expert-output statistics."""

    method = ""

    def __init__(self, adapter, block, r: int):
        self.moe, self.block = adapter.bind(block), block
        self.n = self.moe.num_experts()
        self.k = self.moe.top_k()
        self.r = r
        self.groups = self.moe.expert_groups()

    def _prepare(self, x: torch.Tensor, target: torch.Tensor | None):
        """Flatten one batch. With a target (the original MoE output), subtract the never-pruned shared
        experts from it; without, the target is the original routing over the computed expert outputs
        (`_with_original`). Returns x (T, H), target (T, H) float64 or None, logits (T, E)."""
        hidden = x.shape[-1]
        x = x.reshape(-1, hidden)
        if target is not None:
            target = target.reshape(-1, hidden).to(device=x.device, dtype=torch.float64)
            shared = self.moe.shared_output(x)
            if shared is not None:  # shared experts are never pruned: score the routed part only
                target = target - shared.to(torch.float64)
        return x, target, self.moe.router_logits(x)  # logits: (T, E)

    def _with_original(self, target, logits, needed):
        """Without a target: the original routing (weights, indices), each (T, k), becomes the target for
        `token_stats`, and its experts are added to `needed` (T, E). For most routers some candidate
        routes each token as the original block does, so they are needed anyway; under group-limited
        routing with few kept experts per group no candidate may keep a token's whole top-k."""
        if target is not None:
            return target, needed
        weight, idx = self.moe.route(logits)  # (T, k): the unpruned block's routing
        return (weight, idx), needed.scatter(1, idx, True)

    def _device(self) -> torch.device:
        return next(self.block.parameters()).device  # the compute device, where the layer is

    def _token_chunks(self, n_tok: int, hidden: int, slots: int):
        """Token slices whose expert outputs (`slots` per token, float64) fit in _BYTES_PER_CHUNK."""
        size = _work_size(_BYTES_PER_CHUNK, self._device())
        step = max(1, min(n_tok, size // (max(1, slots) * hidden * 8)))
        for t0 in range(0, n_tok, step):
            yield slice(t0, min(n_tok, t0 + step))

    def _candidate_chunks(self, n_tok: int, n_cand: int):
        step = max(1, _work_size(_ROUTE_ELEMENTS, self._device()) // max(1, n_tok * self.n))
        for c0 in range(0, n_cand, step):
            yield slice(c0, min(n_cand, c0 + step))

    def _stats(self, x, target, needed, n_slots: int, combine=None,
               score: bool = True) -> tuple[TokenStats | None, torch.Tensor | None]:
        """Each needed expert's output once, through the library's experts module, reduced to inner products.
        target: (T, H) float64, or the original routing (see `_with_original`); combine: see `token_stats`.
        score=False: only the combined output, from the same expert outputs (a resumed layer's replay)."""
        slot = slots_from_mask(needed)
        token_idx, expert_idx = needed.nonzero(as_tuple=True)
        with phase("expert_outputs"):
            y = self.moe.expert_outputs(x[token_idx], expert_idx)
        with phase("statistics"):
            if not score:
                ys = slot_outputs(y, token_idx, slot[token_idx, expert_idx], x.shape[0], n_slots)
                return None, None if combine is None else routed_output(ys, slot, *combine)
            return token_stats(y, token_idx, slot[token_idx, expert_idx], x.shape[0], n_slots, target, slot,
                               combine)

    def _balanced(self, kept: torch.Tensor) -> torch.Tensor | bool | None:
        """(C,) bool on the host: whether each candidate keeps as many experts in every routing group (one bool
        when all agree; None without groups). Candidates of both kinds are routed separately, each by its rule (`MoEAdapter.route`),
        so that a candidate's loss does not depend on which others share its chunk."""
        if self.groups is None:
            return None
        balanced = balanced_rows(self.groups, self.n, kept)  # (C,)
        return bool(balanced[0]) if bool((balanced == balanced[0]).all()) else balanced

    def _sq_errors(self, stats: TokenStats, logits: torch.Tensor, kept: torch.Tensor,
                   balanced: torch.Tensor | bool | None, missing: torch.Tensor) -> torch.Tensor:
        """(C,) squared errors of candidates `kept` (C, r') summed over the tokens of `stats`. balanced: None
        without routing groups, else whether each candidate is balanced ((C,) bool, or one bool for all)."""
        out = torch.empty(kept.shape[0], dtype=torch.float64, device=logits.device)
        if balanced is None or isinstance(balanced, bool):  # no groups, or every candidate of one kind
            kinds = [(None, balanced)]
        else:
            kinds = [(torch.nonzero(balanced == b).flatten(), b) for b in (True, False) if bool((balanced == b).any())]
        for which, is_balanced in kinds:
            sub = kept if which is None else kept[which.to(kept.device)]
            part = torch.empty(sub.shape[0], dtype=torch.float64, device=logits.device)
            for sl in self._candidate_chunks(logits.shape[0], sub.shape[0]):
                w, idx = self.moe.route(logits, sub[sl], balanced=is_balanced)
                part[sl] = sq_errors(stats, w, idx, missing)
            if which is None:
                out = part
            else:
                out[which.to(out.device)] = part
        return out

    @staticmethod
    def _check(missing: torch.Tensor) -> None:
        if bool(missing):
            raise RuntimeError("a candidate routes a token to an expert whose output was not computed")

    def _result(self, drop: tuple[int, ...], best_loss: float, losses: dict, **extra) -> dict:
        return {
            "kept_experts": [e for e in range(self.n) if e not in drop],
            "dropped_experts": list(drop),
            "search": self.method,
            "n_candidates": count_drop_sets(self.n, self.r, self.groups),
            **extra,
            "best_loss": best_loss,
            "loss": {drop_key(d): v for d, v in losses.items()},
        }


class ExhaustiveScorer(_LayerSearch):
    """The paper's search: L(D) for every drop set D, accumulated one calibration batch at a time."""

    method = "exhaustive"

    def __init__(self, adapter, block, r: int):
        super().__init__(adapter, block, r)
        self.drops = drop_sets(self.n, r, self.groups)
        self.losses = torch.zeros(len(self.drops), dtype=torch.float64)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, target: torch.Tensor | None = None,
                  route: tuple[torch.Tensor, torch.Tensor] | None = None, score: bool = True) -> torch.Tensor | None:
        """x: MoE input (..., H) for this batch; target: the original model's MoE output (..., H) when x
        is not the original model's MoE input, else None (the original routing of x is the target).

        route: the block's own routing of x (weights, expert indices), each (tokens, k), as its router handed
        them to its experts module: then the routed experts' output sum_k w_k y_k, from the expert outputs
        computed here, is returned ((tokens, H) in x's dtype; the float64 sum rounded once), or None when one
        of them was not computed (method/pruning.py: the layer forward reuses it instead of running the experts).
        score=False: compute the same expert outputs and return that output, but score nothing (a resumed run
        replays a finished layer's forward exactly so).
        """
        x, target, logits = self._prepare(x, target)
        kept = kept_tensor(self.n, self.drops, x.device)
        balanced = None if self.groups is None else True  # drop_sets are balanced
        sq = torch.zeros(len(self.drops), dtype=torch.float64, device=x.device)
        missing = torch.zeros((), dtype=torch.bool, device=x.device)
        out = None if route is None else torch.empty_like(x)
        for ts in self._token_chunks(x.shape[0], x.shape[1], self.n):  # a token may need every expert
            combine = None if route is None else (route[0][ts], route[1][ts])
            part, y = self._chunk(x[ts], None if target is None else target[ts], logits[ts], kept, balanced,
                                  missing, combine, score)
            if score:
                sq += part
            if out is not None:
                if y is None:
                    out = None
                else:
                    out[ts] = y.to(out.dtype)
        if score:
            self._check(missing)
            self.losses += sq.sqrt().cpu()
        return out

    def _chunk(self, x, target, logits, kept, balanced, missing, combine, score=True):
        # Which (token, expert) pairs does any candidate route to? Exactly those get computed.
        with phase("statistics"):
            needed = torch.zeros(x.shape[0], self.n, dtype=torch.bool, device=x.device)
            for sl in self._candidate_chunks(x.shape[0], kept.shape[0]):
                _, idx = self.moe.route(logits, kept[sl], balanced=balanced)  # (C, T, k)
                needed.scatter_(1, idx.permute(1, 0, 2).reshape(x.shape[0], -1), True)
            target, needed = self._with_original(target, logits, needed)
        stats, y = self._stats(x, target, needed, int(needed.sum(1).max()), combine, score)
        if not score:
            return None, y
        with phase("search"):
            return self._sq_errors(stats, logits, kept, balanced, missing), y

    def result(self) -> dict:
        losses = self.losses.tolist()
        best = argmin_first(losses)
        return self._result(self.drops[best], losses[best], dict(zip(self.drops, losses)),
                            n_evaluated=len(losses))


@dataclass
class _Batch:
    """One calibration batch's statistics for the beam search, on the compute device or in host memory."""

    logits: torch.Tensor  # (T, E)
    stats: TokenStats
    on_host: bool

    @property
    def nbytes(self) -> int:
        return self.logits.nbytes + self.stats.nbytes


class BeamSearch(_LayerSearch):
    """Same objective, for expert counts where enumeration is impossible (C(64, 32) ~ 1.8e18).

    Calibration statistics (inner products of the outputs of each token's top n_drop + k
    experts and of those tied with the last of them, `rank_bound_mask`, computed in token
    chunks) are kept, then:
      1. greedy elimination with a beam: from each beam state, try dropping one more expert
         (respecting routing groups); keep the `beam_width` best states; repeat until
         n_drop experts are dropped;
      2. swap refinement: replace one dropped expert with one kept expert while that lowers
         L(D), for at most `swap_rounds` rounds.
    Every candidate is scored with the exact objective L(D) on all calibration tokens.

    Memory. The statistics take `stats_bytes_per_token` bytes per calibration token (for DeepSeek-V3 at
    r = 128 and 128 x 2048 tokens, 20.2 GB), all of which every scoring pass reads. They are kept on the
    compute device up to `stats_budget` bytes, one calibration batch at a time in calibration order; the
    batches beyond it are kept in host memory (page-locked on a GPU) and copied to the device for every
    scoring pass, the next one while the current one is scored. On the device, the search holds at most
    the budget plus two batches' statistics (while a batch is assembled from its token chunks, or while
    host batches are scored: the current one and the next), the expert outputs of one token chunk
    (`_BYTES_PER_CHUNK`) and the routing of one candidate chunk (`_ROUTE_ELEMENTS`). Where the
    statistics are kept changes nothing in the arithmetic: the losses are the same, bit for bit.
    """

    method = "beam"

    def __init__(self, adapter, block, r: int, beam_width: int, swap_rounds: int, stats_budget: int | None = None):
        super().__init__(adapter, block, r)
        self.beam_width, self.swap_rounds = beam_width, swap_rounds
        self.stats_budget = stats_budget  # bytes on the compute device; None: no limit
        self.batches: list[_Batch] = []
        self.n_evaluated = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, target: torch.Tensor | None = None,
                  route: tuple[torch.Tensor, torch.Tensor] | None = None, score: bool = True) -> torch.Tensor | None:
        """As ExhaustiveScorer.add_batch."""
        x, target, logits = self._prepare(x, target)
        with phase("statistics"):
            needed = rank_bound_mask(self.moe.choice_scores(logits), self.n - self.r, self.k,
                                     self.groups)  # (T, E)
            target, needed = self._with_original(target, logits, needed)
            n_slots = int(needed.sum(1).max())
        parts, out = [], None if route is None else torch.empty_like(x)
        for ts in self._token_chunks(x.shape[0], x.shape[1], n_slots):
            rows = tuple(t[ts] for t in target) if isinstance(target, tuple) else target[ts]
            combine = None if route is None else (route[0][ts], route[1][ts])
            stats, y = self._stats(x[ts], rows, needed[ts], n_slots, combine, score)
            parts.append(stats)
            if out is not None:
                if y is None:
                    out = None
                else:
                    out[ts] = y.to(out.dtype)
        if not score:
            return out
        with phase("statistics"):
            stats = parts[0] if len(parts) == 1 else TokenStats(**{
                k: None if v is None else torch.cat([getattr(p, k) for p in parts]) for k, v in vars(parts[0]).items()})
            del parts
            self._keep(_Batch(logits, stats, on_host=False))
        return out

    def _keep(self, batch: _Batch) -> None:
        on_device = sum(b.nbytes for b in self.batches if not b.on_host)
        if self.stats_budget is not None and on_device + batch.nbytes > self.stats_budget:
            pin = batch.logits.device.type == "cuda"
            with phase("transfer"):
                batch = _Batch(_to_host(batch.logits, pin), batch.stats.to("cpu", pin_memory=pin), on_host=True)
        self.batches.append(batch)

    def memory(self) -> dict:
        """Where the statistics are kept (bytes), for the layer's record."""
        host = [b.nbytes for b in self.batches if b.on_host]
        return {"bytes": sum(b.nbytes for b in self.batches), "host_bytes": sum(host), "batches_on_host": len(host),
                "batches": len(self.batches), "budget_bytes": self.stats_budget}

    def _on_device(self, device: torch.device):
        """Yield each batch's (logits, stats) on `device`; host batches are copied one batch ahead, on a side
        stream on a GPU, so that the copy of the next batch overlaps the scoring of this one."""
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None

        def fetch(b: _Batch):
            if not b.on_host:
                return b.logits, b.stats, None
            if stream is None:
                return b.logits.to(device), b.stats.to(device), None
            with torch.cuda.stream(stream):
                logits, stats = b.logits.to(device, non_blocking=True), b.stats.to(device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            main = torch.cuda.current_stream(device)
            for t in (logits, *stats.tensors().values()):
                t.record_stream(main)  # allocated on the side stream, used on the main one
            return logits, stats, done

        ahead = fetch(self.batches[0]) if self.batches else None
        for i in range(len(self.batches)):
            logits, stats, done = ahead
            ahead = fetch(self.batches[i + 1]) if i + 1 < len(self.batches) else None
            if done is not None:
                torch.cuda.current_stream(device).wait_event(done)
            yield logits, stats

    @torch.no_grad()
    def losses(self, drops: list[tuple[int, ...]]) -> list[float]:
        """L(D) of each drop set (all of the same size), over every stored calibration batch."""
        device = self._device()
        kept_host = kept_tensor(self.n, drops)  # (C, r); the group check on the host, without a GPU wait
        balanced = self._balanced(kept_host)
        kept = kept_host.to(device)
        missing = torch.zeros((), dtype=torch.bool, device=device)
        total = torch.zeros(len(drops), dtype=torch.float64, device=device)
        for logits, stats in self._on_device(device):
            total += self._sq_errors(stats, logits, kept, balanced, missing).sqrt()
        self._check(missing)
        self.n_evaluated += len(drops)
        return total.cpu().tolist()

    def _group_of(self) -> list[int] | None:
        return None if self.groups is None else group_owner(self.groups, self.n)

    def _ranked(self, drops: list[tuple[int, ...]]) -> list[tuple[float, tuple[int, ...]]]:
        return sorted(zip(self.losses(drops), drops))

    def result(self) -> dict:
        with phase("search"):
            return self._search()

    def _search(self) -> dict:
        n_drop = self.n - self.r
        owner = self._group_of()
        per_group = n_drop // len(self.groups) if self.groups else n_drop
        trace = []
        beam: list[tuple[int, ...]] = [()]
        ranked = [(0.0, ())]
        start = time.perf_counter()
        for step in range(n_drop):
            cands = sorted({tuple(sorted(d + (e,))) for d in beam for e in range(self.n) if e not in d
                            and (owner is None or sum(owner[x] == owner[e] for x in d) < per_group)})
            ranked = self._ranked(cands)
            beam = [d for _, d in ranked[: self.beam_width]]
            trace.append({"dropped": len(beam[0]), "best_loss": ranked[0][0], "n_candidates": len(cands)})
            logger.debug("beam step %d/%d: %d candidates, best loss %.6g, %d scored in %.1f s", step + 1, n_drop,
                         len(cands), ranked[0][0], self.n_evaluated, time.perf_counter() - start)
        best_loss, best = ranked[0]
        finalists = dict((d, l) for l, d in ranked[: self.beam_width])
        rounds = 0
        for rounds in range(1, self.swap_rounds + 1):
            swaps = sorted({tuple(sorted((set(best) - {a}) | {b})) for a in best for b in range(self.n)
                            if b not in best and (owner is None or owner[a] == owner[b])})
            if not swaps:
                break
            loss, cand = self._ranked(swaps)[0]
            trace.append({"swap_round": rounds, "best_loss": loss, "n_candidates": len(swaps)})
            if loss >= best_loss:
                break
            best_loss, best = loss, cand
            finalists[cand] = loss
        return self._result(best, best_loss, finalists, n_evaluated=self.n_evaluated,
                            beam_width=self.beam_width, swap_rounds=rounds, trace=trace,
                            statistics_memory=self.memory())


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) if pin else t.to("cpu")


SEARCHES = {"exhaustive": ExhaustiveScorer, "beam": BeamSearch}


def make_search(adapter, block, r: int, search: str, exhaustive_limit: int, beam_width: int, swap_rounds: int,
                stats_budget: int | None = None):
    """The exact enumeration when it has at most `exhaustive_limit` candidates (or when asked), else beam search.

    The settings are main.py's flags of the same names (their defaults live in `main.RunConfig`); stats_budget:
    bytes of device memory for the beam search's statistics (None: no limit).
    """
    if search == "auto":
        n_cand = count_drop_sets(adapter.num_experts(block), r, adapter.expert_groups(block))
        search = "exhaustive" if n_cand <= exhaustive_limit else "beam"
    if search == "exhaustive":
        return ExhaustiveScorer(adapter, block, r)
    if search == "beam":
        return BeamSearch(adapter, block, r, beam_width=beam_width, swap_rounds=swap_rounds, stats_budget=stats_budget)
    raise ValueError(f"unknown search {search!r}; choose auto, exhaustive or beam")
