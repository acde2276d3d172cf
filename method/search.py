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
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

# Work sizes: bound memory whatever the model and calibration size.
_BYTES_PER_CHUNK = 1 << 30  # float64 expert outputs of one token chunk
_ROUTE_ELEMENTS = 1 << 24  # candidates x tokens x experts routed at once


def drop_sets(n_experts: int, r: int) -> list[tuple[int, ...]]:
    """Every set of n_experts - r dropped experts, in itertools.combinations order."""
    return list(itertools.combinations(range(n_experts), n_experts - r))


def kept_tensor(n_experts: int, drops: list[tuple[int, ...]], device=None) -> torch.Tensor:
    """(candidates, r) sorted kept experts for each drop set."""
    rows = [[e for e in range(n_experts) if e not in set(d)] for d in drops]
    return torch.tensor(rows, dtype=torch.long, device=device).view(len(drops), -1)


def drop_key(drop: tuple[int, ...]) -> str:
    """JSON key of a drop set, e.g. (0, 3) -> "0,3"."""
    return ",".join(map(str, drop))


@dataclass
class TokenStats:
    """Inner products for one chunk of tokens; all float64.

    slot:  (T, E) long, position of expert e in token t's computed set, -1 if not computed
    gram:  (T, M, M) <y_m, y_n> between the computed experts' outputs of each token
    cross: (T, M) <target, y_m>
    z2:    (T,) <target, target>
    """

    slot: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    z2: torch.Tensor


def slots_from_mask(needed: torch.Tensor) -> torch.Tensor:
    """(T, E) bool -> (T, E) long: rank of each needed expert within its token's row, -1 elsewhere."""
    pos = needed.long().cumsum(dim=-1) - 1
    return torch.where(needed, pos, torch.full_like(pos, -1))


def token_stats(y: torch.Tensor, token_idx: torch.Tensor, slot_idx: torch.Tensor, n_tokens: int,
                n_slots: int, target: torch.Tensor, slot: torch.Tensor) -> TokenStats:
    """Inner products of expert outputs and target.

    y:          (N, H) output of expert pair n on its token (any float dtype)
    token_idx:  (N,) token of pair n; slot_idx: (N,) its slot
    target:     (T, H) float64 target of the routed experts
    """
    ys = torch.zeros(n_tokens, n_slots, y.shape[-1], dtype=torch.float64, device=y.device)
    ys[token_idx, slot_idx] = y.to(torch.float64)
    gram = ys @ ys.transpose(1, 2)  # (T, M, M)
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
    # Rounding can push an exact-zero error a hair below zero; a squared norm is >= 0.
    return err.clamp_min(0.0).sum(-1)


def argmin_first(losses: list[float]) -> int:
    """Index of the smallest loss, the first one on ties."""
    return min(range(len(losses)), key=lambda i: (losses[i], i))


class ExhaustiveScorer:
    """Accumulates L(D) for every drop set D of one MoE block, one calibration batch at a time."""

    def __init__(self, adapter, block, r: int):
        self.adapter, self.block = adapter, block
        self.n = adapter.num_experts(block)
        self.r = r
        self.drops = drop_sets(self.n, r)
        self.losses = torch.zeros(len(self.drops), dtype=torch.float64)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """x: MoE input (..., H) for this batch; target: original MoE output (..., H)."""
        hidden = x.shape[-1]
        x = x.reshape(-1, hidden)
        device = x.device
        target = target.reshape(-1, hidden).to(device=device, dtype=torch.float64)
        shared = self.adapter.shared_output(self.block, x)
        if shared is not None:  # shared experts are never pruned: score the routed part only
            target = target - shared.to(torch.float64)
        logits = self.adapter.router_logits(self.block, x)  # (T, E)
        kept = kept_tensor(self.n, self.drops, device)
        n_tok = x.shape[0]
        tok_chunk = max(1, min(n_tok, _BYTES_PER_CHUNK // (self.n * hidden * 8)))
        sq = torch.zeros(len(self.drops), dtype=torch.float64, device=device)
        for t0 in range(0, n_tok, tok_chunk):
            t1 = min(n_tok, t0 + tok_chunk)
            sq += self._chunk(x[t0:t1], target[t0:t1], logits[t0:t1], kept)
        self.losses += sq.sqrt().cpu()

    def _candidate_chunks(self, n_tok: int, kept: torch.Tensor):
        step = max(1, _ROUTE_ELEMENTS // max(1, n_tok * self.n))
        for c0 in range(0, kept.shape[0], step):
            yield slice(c0, min(kept.shape[0], c0 + step))

    def _chunk(self, x, target, logits, kept) -> torch.Tensor:
        n_tok = x.shape[0]
        # 1) which (token, expert) pairs does any candidate route to?
        needed = torch.zeros(n_tok, self.n, dtype=torch.bool, device=x.device)
        for sl in self._candidate_chunks(n_tok, kept):
            _, idx = self.adapter.route(self.block, logits, kept[sl])  # (C, T, k)
            needed.scatter_(1, idx.permute(1, 0, 2).reshape(n_tok, -1), True)
        # 2) each needed expert output once, through the library's experts module
        slot = slots_from_mask(needed)
        token_idx, expert_idx = needed.nonzero(as_tuple=True)
        y = self.adapter.expert_outputs(self.block, x[token_idx], expert_idx)
        stats = token_stats(y, token_idx, slot[token_idx, expert_idx], n_tok, int(needed.sum(1).max()),
                            target, slot)
        # 3) score every candidate from inner products
        out = torch.empty(kept.shape[0], dtype=torch.float64, device=x.device)
        for sl in self._candidate_chunks(n_tok, kept):
            w, idx = self.adapter.route(self.block, logits, kept[sl])
            out[sl] = sq_errors(stats, w, idx)
        return out

    def result(self) -> dict:
        """The decision and every candidate's loss."""
        losses = self.losses.tolist()
        best = argmin_first(losses)
        dropped = list(self.drops[best])
        return {
            "kept_experts": [e for e in range(self.n) if e not in dropped],
            "dropped_experts": dropped,
            "search": "exhaustive",
            "n_candidates": len(losses),
            "best_loss": losses[best],
            "loss": {drop_key(d): v for d, v in zip(self.drops, losses)},
        }
