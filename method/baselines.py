"""Baseline expert-pruning criteria, for comparison with the paper's reconstruction search.

Each keeps, per MoE layer, the r experts with the highest per-expert score and prunes the rest
exactly as the paper's methods do (`adapter.prune`, `adapter.prune_config`):

- random_pruning:    the paper's random-drop baseline. Scores are uniform random keys drawn from
                     `random.Random(args.seed)` (n_experts draws per MoE layer, layers in order), so the
                     kept set is a uniformly random r-subset; no calibration compute.
- frequency_pruning: how many calibration tokens have the expert in their top-k.
- reap_pruning:      REAP saliency (Lasby et al. 2025, "REAP: Router-weighted Expert Activation
                     Pruning"): the mean, over the calibration tokens routed to the expert (the expert in
                     the token's top-k), of g_e(x) * ||y_e(x)||_2, with g_e the routing weight the block
                     applies (after top-k renormalisation / scaling factors, as the family's router
                     computes it) and y_e the expert's output through the library's experts module.
                     An expert no calibration token is routed to gets saliency 0.

Frequency and REAP read the ORIGINAL model's MoE inputs (layer by layer through `LayerRunner`: every
layer is scored before it is pruned, and the next layer's inputs are computed before that). Ties go to
the lower expert index; with group-limited routing every group keeps r / n_groups experts, its best.
pruning_info.json gets, per layer, the kept and dropped experts, "search" = the method name and
"scores" = {"<expert>": score} in place of the search's per-candidate losses.
"""

from __future__ import annotations

import logging
import random

import torch

from model.runner import capture_io, layer_runner

from .pruning import check_r

logger = logging.getLogger(__name__)

_PAIR_ELEMENTS = 1 << 26  # (token, expert) pairs x hidden computed at once by REAP: bounds its memory


def top_r(scores: list[float], r: int, groups: list[list[int]] | None = None) -> list[int]:
    """Sorted indices of the r highest scores; ties go to the lower index.

    With routing groups, each group keeps its r / len(groups) best (the pruned block needs equal groups).
    """
    groups = groups or [list(range(len(scores)))]
    per_group = r // len(groups)
    kept = []
    for members in groups:
        kept += sorted(members, key=lambda e: (-scores[e], e))[:per_group]
    return sorted(kept)


def _prune_layers(model, blocks: dict, r: int, layer_scores: dict[int, tuple[list[float], dict]], name: str):
    """Keep the top-r experts of every scored layer; return the method's info dict."""
    layers_info = {}
    for idx, (scores, extra) in layer_scores.items():
        adapter, block = blocks[idx]
        kept = top_r(scores, r, adapter.expert_groups(block))
        adapter.prune(block, kept)
        dropped = [e for e in range(len(scores)) if e not in kept]
        logger.info("layer %d: drop %s (%s)", idx, dropped, name)
        layers_info[str(idx)] = {"kept_experts": kept, "dropped_experts": dropped, "search": name,
                                 "scores": {str(e): s for e, s in enumerate(scores)}, **extra}
    next(iter(blocks.values()))[0].prune_config(model.config, r)
    info = {"layers": layers_info}
    if getattr(model.config, "betas", None):
        # As method/pruning.py: betas were calibrated on the unpruned routing.
        del model.config.betas
        info["removed_stale_betas"] = True
        logger.warning("removed `betas` from the config: re-run --method dynamic_skipping on the pruned checkpoint")
    return info


@torch.no_grad()
def random_pruning(model, calib_loader, args):
    """The paper's random-drop baseline; `calib_loader` is not used."""
    blocks = check_r(model, args.r)
    rng = random.Random(args.seed)
    keys = {}
    for idx in sorted(blocks):  # layers in order, one draw per expert: the keys depend on the seed only
        adapter, block = blocks[idx]
        keys[idx] = ([rng.random() for _ in range(adapter.num_experts(block))], {})
    return model, _prune_layers(model, blocks, args.r, keys, "random_pruning")


class FrequencyScore:
    """Per expert, how many tokens have it in their top-k (the block's own routing rule)."""

    def __init__(self, adapter, block):
        self.adapter, self.block = adapter, block
        self.counts = torch.zeros(adapter.num_experts(block), dtype=torch.int64)
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x: (tokens, hidden) MoE input of one calibration batch."""
        _, idx = self.adapter.route(self.block, self.adapter.router_logits(self.block, x))  # (tokens, k)
        self.counts += torch.bincount(idx.reshape(-1).cpu(), minlength=len(self.counts))
        self.n_tokens += x.shape[0]

    def result(self) -> tuple[list[float], dict]:
        return self.counts.tolist(), {"n_tokens": self.n_tokens}


class ReapScore:
    """Per expert e, mean over tokens routed to e of g_e(x) * ||y_e(x)||_2, accumulated in float64."""

    def __init__(self, adapter, block):
        self.adapter, self.block = adapter, block
        n = adapter.num_experts(block)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.int64)
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x: (tokens, hidden) MoE input of one calibration batch."""
        w, idx = self.adapter.route(self.block, self.adapter.router_logits(self.block, x))  # (tokens, k) each
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(idx.shape[-1])  # (pairs,)
        expert, weight = idx.reshape(-1), w.reshape(-1).to(torch.float64)  # (pairs,)
        sums = torch.zeros(len(self.sums), dtype=torch.float64, device=x.device)
        step = max(1, _PAIR_ELEMENTS // x.shape[-1])
        for p0 in range(0, len(expert), step):
            sl = slice(p0, p0 + step)
            y = self.adapter.expert_outputs(self.block, x[token[sl]], expert[sl])  # (pairs, hidden), model dtype
            sums.index_add_(0, expert[sl], weight[sl] * torch.linalg.vector_norm(y.to(torch.float64), dim=-1))
        self.sums += sums.cpu()
        self.counts += torch.bincount(expert.cpu(), minlength=len(self.counts))
        self.n_tokens += x.shape[0]

    def result(self) -> tuple[list[float], dict]:
        # Never-routed experts: no evidence of any contribution, saliency 0.
        saliency = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), 0.0)
        return saliency.tolist(), {"routed_tokens": {str(e): c for e, c in enumerate(self.counts.tolist())},
                                   "n_tokens": self.n_tokens}


@torch.no_grad()
def _calibrated(model, calib_loader, args, score_cls, name: str):
    blocks = check_r(model, args.r)
    runner = layer_runner(model, args)
    states = runner.capture(calib_loader)  # inputs of layer 0
    layer_scores = {}
    for idx, layer in runner.iter_layers(desc=name.replace("_", " ")):
        if idx not in blocks:
            states = runner.forward_all(layer, states)
            continue
        adapter, block = blocks[idx]
        scorer = score_cls(adapter, block)
        new_states = []
        for b in runner.each(states):
            with capture_io(block) as io:
                new_states.append(runner.forward(layer, b))
            x = io["inputs"][0]
            scorer.add_batch(x.reshape(-1, x.shape[-1]))
        states = new_states  # the unpruned layer's outputs: the next layer is scored on the original model
        layer_scores[idx] = scorer.result()
    return model, _prune_layers(model, blocks, args.r, layer_scores, name)


def frequency_pruning(model, calib_loader, args):
    return _calibrated(model, calib_loader, args, FrequencyScore, "frequency_pruning")


def reap_pruning(model, calib_loader, args):
    return _calibrated(model, calib_loader, args, ReapScore, "reap_pruning")
