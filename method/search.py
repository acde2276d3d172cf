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
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Work sizes: bound memory whatever the model and calibration size.
_BYTES_PER_CHUNK = 1 << 30  # expert outputs of one token chunk, at 8 bytes per value
_ROUTE_ELEMENTS = 1 << 24  # candidates x tokens x experts routed at once


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
    """Inner products for one chunk of tokens (float64, but `slot` and the original routing).

    slot:  (T, E) long, position of expert e in token t's computed set, -1 if not computed
    gram:  (T, M, M) <y_m, y_n> between the computed experts' outputs of each token
    cross: (T, M) <target, y_m>
    z2:    (T,) <target, target>
    orig_slot, orig_weight: (T, k) the original routing (slots, weights as the router gives them)
           when the target is its output, else None
    """

    slot: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    z2: torch.Tensor
    orig_slot: torch.Tensor | None = None
    orig_weight: torch.Tensor | None = None


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


def token_stats(y: torch.Tensor, token_idx: torch.Tensor, slot_idx: torch.Tensor, n_tokens: int,
                n_slots: int, target: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                slot: torch.Tensor) -> TokenStats:
    """Inner products of expert outputs and target.

    y:          (N, H) output of expert pair n on its token, in the model dtype
    token_idx:  (N,) token of pair n; slot_idx: (N,) its slot
    target:     (T, H) float64 target of the routed experts, or the original routing
                (weights, expert indices), each (T, k), whose output over these same y is the target

    The Gram matrix (the T * M^2 * H part) is computed in float64 for float32 models. For
    bfloat16/float16 models it is computed in float32 with TF32 on GPUs: the outputs have
    at most 10 mantissa bits, so TF32 products are exact and only the float32 accumulation
    rounds (~1e-6 relative, below the model dtype's own rounding); the rest is float64.
    """
    half = y.dtype in (torch.bfloat16, torch.float16)
    ys = torch.zeros(n_tokens, n_slots, y.shape[-1], dtype=torch.float32 if half else torch.float64,
                     device=y.device)
    ys[token_idx, slot_idx] = y.to(ys.dtype)
    with _tf32(half):
        gram = (ys @ ys.transpose(1, 2)).to(torch.float64)  # (T, M, M)
    if isinstance(target, tuple):  # target = sum_k w_k y_k: its inner products are sums of Gram entries
        weight, idx = target
        orig_slot = slot.gather(1, idx)  # (T, k)
        if bool((orig_slot < 0).any()):
            raise RuntimeError("the original routing uses an expert whose output was not computed")
        rows = torch.arange(n_tokens, device=gram.device).unsqueeze(-1)
        w = weight.to(torch.float64)
        cross = torch.einsum("tk,tkm->tm", w, gram[rows, orig_slot])  # (T, M)
        z2 = (w * cross.gather(1, orig_slot)).sum(-1)  # (T,)
        return TokenStats(slot=slot, gram=gram, cross=cross, z2=z2, orig_slot=orig_slot, orig_weight=weight)
    ys = ys.to(torch.float64)
    cross = (ys @ target.unsqueeze(-1)).squeeze(-1)  # (T, M)
    z2 = (target * target).sum(-1)  # (T,)
    return TokenStats(slot=slot, gram=gram, cross=cross, z2=z2)


def sq_errors(stats: TokenStats, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||target_t - sum_k w_k y_k||^2 for each candidate routing.

    weights, indices: (C, T, k) routing of C candidates on the chunk's T tokens.
    Returns (C,) float64.
    """
    c, t, k = indices.shape
    rows = torch.arange(t, device=indices.device).view(1, t, 1)
    s = stats.slot[rows, indices]  # (C, T, k)
    if bool((s < 0).any()):
        raise RuntimeError("a candidate routes a token to an expert whose output was not computed")
    w = weights.to(torch.float64)
    cross = stats.cross[rows, s]  # (C, T, k)
    gram = stats.gram[rows.unsqueeze(-1), s.unsqueeze(-1), s.unsqueeze(-2)]  # (C, T, k, k)
    err = stats.z2 - 2.0 * (w * cross).sum(-1) + torch.einsum("ctk,ctkl,ctl->ct", w, gram, w)
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

    def _token_chunks(self, n_tok: int, hidden: int, slots: int):
        """Token slices whose expert outputs (`slots` per token, float64) fit in _BYTES_PER_CHUNK."""
        step = max(1, min(n_tok, _BYTES_PER_CHUNK // (max(1, slots) * hidden * 8)))
        for t0 in range(0, n_tok, step):
            yield slice(t0, min(n_tok, t0 + step))

    def _candidate_chunks(self, n_tok: int, n_cand: int):
        step = max(1, _ROUTE_ELEMENTS // max(1, n_tok * self.n))
        for c0 in range(0, n_cand, step):
            yield slice(c0, min(n_cand, c0 + step))

    def _stats(self, x, target, needed) -> TokenStats:
        """Each needed expert's output once, through the library's experts module, reduced to inner products.
        target: (T, H) float64, or the original routing (see `_with_original`)."""
        slot = slots_from_mask(needed)
        token_idx, expert_idx = needed.nonzero(as_tuple=True)
        y = self.moe.expert_outputs(x[token_idx], expert_idx)
        return token_stats(y, token_idx, slot[token_idx, expert_idx], x.shape[0], int(needed.sum(1).max()),
                           target, slot)

    def _sq_errors(self, stats: TokenStats, logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """(C,) squared errors of candidates `kept` (C, r') summed over the chunk's tokens."""
        out = torch.empty(kept.shape[0], dtype=torch.float64, device=logits.device)
        for sl in self._candidate_chunks(logits.shape[0], kept.shape[0]):
            w, idx = self.moe.route(logits, kept[sl])
            out[sl] = sq_errors(stats, w, idx)
        return out

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
    def add_batch(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """x: MoE input (..., H) for this batch; target: the original model's MoE output (..., H) when x
        is not the original model's MoE input, else None (the original routing of x is the target)."""
        x, target, logits = self._prepare(x, target)
        kept = kept_tensor(self.n, self.drops, x.device)
        sq = torch.zeros(len(self.drops), dtype=torch.float64, device=x.device)
        for ts in self._token_chunks(x.shape[0], x.shape[1], self.n):  # a token may need every expert
            sq += self._chunk(x[ts], None if target is None else target[ts], logits[ts], kept)
        self.losses += sq.sqrt().cpu()

    def _chunk(self, x, target, logits, kept) -> torch.Tensor:
        # Which (token, expert) pairs does any candidate route to? Exactly those get computed.
        needed = torch.zeros(x.shape[0], self.n, dtype=torch.bool, device=x.device)
        for sl in self._candidate_chunks(x.shape[0], kept.shape[0]):
            _, idx = self.moe.route(logits, kept[sl])  # (C, T, k)
            needed.scatter_(1, idx.permute(1, 0, 2).reshape(x.shape[0], -1), True)
        target, needed = self._with_original(target, logits, needed)
        return self._sq_errors(self._stats(x, target, needed), logits, kept)

    def result(self) -> dict:
        losses = self.losses.tolist()
        best = argmin_first(losses)
        return self._result(self.drops[best], losses[best], dict(zip(self.drops, losses)),
                            n_evaluated=len(losses))


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
    """

    method = "beam"

    def __init__(self, adapter, block, r: int, beam_width: int, swap_rounds: int):
        super().__init__(adapter, block, r)
        self.beam_width, self.swap_rounds = beam_width, swap_rounds
        self.batches: list[list[tuple[torch.Tensor, TokenStats]]] = []
        self.n_evaluated = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """As ExhaustiveScorer.add_batch."""
        x, target, logits = self._prepare(x, target)
        needed = rank_bound_mask(self.moe.choice_scores(logits), self.n - self.r, self.k,
                                 self.groups)  # (T, E)
        target, needed = self._with_original(target, logits, needed)
        chunks = []
        for ts in self._token_chunks(x.shape[0], x.shape[1], int(needed.sum(1).max())):
            rows = tuple(t[ts] for t in target) if isinstance(target, tuple) else target[ts]
            chunks.append((logits[ts], self._stats(x[ts], rows, needed[ts])))
        self.batches.append(chunks)

    @torch.no_grad()
    def losses(self, drops: list[tuple[int, ...]]) -> list[float]:
        """L(D) of each drop set (all of the same size), over every stored calibration batch."""
        device = next(self.block.parameters()).device  # where add_batch kept the statistics
        kept = kept_tensor(self.n, drops, device)
        total = torch.zeros(len(drops), dtype=torch.float64)
        for chunks in self.batches:
            sq = torch.zeros(len(drops), dtype=torch.float64, device=device)
            for logits, stats in chunks:
                sq += self._sq_errors(stats, logits, kept)
            total += sq.sqrt().cpu()
        self.n_evaluated += len(drops)
        return total.tolist()

    def _group_of(self) -> list[int] | None:
        if self.groups is None:
            return None
        owner = [0] * self.n
        for g, members in enumerate(self.groups):
            for e in members:
                owner[e] = g
        return owner

    def _ranked(self, drops: list[tuple[int, ...]]) -> list[tuple[float, tuple[int, ...]]]:
        return sorted(zip(self.losses(drops), drops))

    def result(self) -> dict:
        n_drop = self.n - self.r
        owner = self._group_of()
        per_group = n_drop // len(self.groups) if self.groups else n_drop
        trace = []
        beam: list[tuple[int, ...]] = [()]
        ranked = [(0.0, ())]
        for _ in range(n_drop):
            cands = sorted({tuple(sorted(d + (e,))) for d in beam for e in range(self.n) if e not in d
                            and (owner is None or sum(owner[x] == owner[e] for x in d) < per_group)})
            ranked = self._ranked(cands)
            beam = [d for _, d in ranked[: self.beam_width]]
            trace.append({"dropped": len(beam[0]), "best_loss": ranked[0][0], "n_candidates": len(cands)})
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
                            beam_width=self.beam_width, swap_rounds=rounds, trace=trace)


SEARCHES = {"exhaustive": ExhaustiveScorer, "beam": BeamSearch}


def make_search(adapter, block, r: int, search: str, exhaustive_limit: int, beam_width: int, swap_rounds: int):
    """The exact enumeration when it has at most `exhaustive_limit` candidates (or when asked), else beam search.

    The settings are main.py's flags of the same names (their defaults live in `main.RunConfig`).
    """
    if search == "auto":
        n_cand = count_drop_sets(adapter.num_experts(block), r, adapter.expert_groups(block))
        search = "exhaustive" if n_cand <= exhaustive_limit else "beam"
    if search == "exhaustive":
        return ExhaustiveScorer(adapter, block, r)
    if search == "beam":
        return BeamSearch(adapter, block, r, beam_width=beam_width, swap_rounds=swap_rounds)
    raise ValueError(f"unknown search {search!r}; choose auto, exhaustive or beam")
