"""Layer-wise and progressive expert pruning (paper Sec. 3.1).

Both walk the decoder one layer at a time through `LayerRunner`. For each MoE layer the
scorer sees the layer's MoE input for every calibration batch (and the original model's
MoE output as the target once progressive pruning has changed that input), then the best
kept set is applied in place.

- layerwise:   MoE inputs come from the original model (every layer judged on the
               activations of the unpruned model); the target is the block's output on
               them, summed in float64 from the scorer's own expert outputs.
- progressive: MoE inputs come from the model pruned so far, targets stay the original
               model's outputs, so later layers compensate for earlier decisions (until
               the first pruned layer the inputs are the original ones: as layerwise).

Each layer's result goes to the runner's journal when there is one, so that a killed run
continues where it stopped (see model/runner.py).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from model.adapters import find_moe_blocks
from model.profiling import phase
from model.runner import budget_bytes, capture_io, layer_runner

from . import search
from .search import make_search

logger = logging.getLogger(__name__)


def layerwise_pruning(model, calib_loader, args):
    return _prune(model, calib_loader, args, progressive=False)


def progressive_pruning(model, calib_loader, args):
    return _prune(model, calib_loader, args, progressive=True)


class _Recorded:
    """Stands in for the search on a layer that a killed run of the same command finished: its result. The layer's
    forward is replayed as that run computed it: the search of the same kind computes the same expert outputs, in
    the same chunks, and hands the layer the same routed output (`scored_forward`), but scores nothing."""

    def __init__(self, info: dict, search):
        self.info, self.search = info, search

    def add_batch(self, x, target=None, route=None) -> torch.Tensor | None:
        # nothing to replay without the router's choice (a block that never called its experts module)
        if target is not None or route is None:
            return None
        return self.search.add_batch(x, None, route, score=False)

    def result(self) -> dict:
        return self.info


def check_r(model, r: int) -> dict:
    """Raise a clear error unless every MoE block can keep r experts; return the blocks."""
    blocks = find_moe_blocks(model)
    for adapter, block in blocks.values():
        adapter.check_r(block, r)
    return blocks


@contextmanager
def scored_forward(moe, scorer, target: torch.Tensor | None = None, discard: bool = False) -> Iterator[dict]:
    """A layer forward whose MoE block hands its experts' work to the scorer: each expert output is computed once.

    While the context is open, the block's experts module (what its router calls with the tokens, the chosen
    experts and their weights) gives its input to `scorer.add_batch(x, target, route=...)`. The scorer computes
    the outputs of every expert some candidate routes a token to, the block's own choice among them (layer-wise
    targets are the original routing), and returns the block's routed output sum_k w_k y_k of the router's
    weights and experts from those outputs: summed in float64 and rounded once to the model dtype, where the
    library's kernel rounds each term (the two agree to the dtype's rounding). The rest of the block (shared
    experts) and of the layer runs as the library's code. If the scorer lacks an output the router asks for
    (e.g. a resumed layer's `_Recorded`), the library's experts module runs as usual.

    discard: the layer's output is not used (progressive pruning's forward of the pruned model's states, run
    for the MoE input only): the experts module returns zeros instead of computing anything.

    A block that does not call its experts module (a hub kernel replacing its forward) is scored from its
    input after the forward, as before. Yields {"reused": bool}.
    """
    experts = moe.experts()
    signature = inspect.signature(type(experts).forward)
    state = {"called": False, "reused": False}

    def forward(*args, **kwargs):
        if state["called"]:  # the scorer's own calls (one expert per token, weight 1), or a second call of the block
            return type(experts).forward(experts, *args, **kwargs)
        bound = signature.bind(experts, *args, **kwargs)
        hidden, indices, weights = list(bound.arguments.values())[1:4]
        state["called"] = True
        out = scorer.add_batch(hidden, target, route=None if discard else (weights, indices))
        if discard:
            return torch.zeros_like(hidden)
        if out is None:
            with phase("forward"):
                return type(experts).forward(experts, *args, **kwargs)
        state["reused"] = True
        return out

    experts.forward = forward  # instance attribute, removed below
    try:
        with capture_io(moe.block) as io:
            yield state
        if not state["called"]:
            scorer.add_batch(io["inputs"][0], target)
    finally:
        experts.__dict__.pop("forward", None)


@torch.no_grad()
def _prune(model, calib_loader, args, progressive: bool):
    if args.r is None:
        raise ValueError("pruning methods need --r, the number of experts to keep per MoE layer")
    blocks = check_r(model, args.r)
    runner = layer_runner(model, args)
    stats_budget = budget_bytes(getattr(args, "stats_budget_gib", None), runner.device)
    last = len(runner.layers) - 1
    # the unpruned model's states entering the current layer; progressive also holds the pruned model's
    original = runner.capture(calib_loader, copies=3 if progressive else 2)
    pruned = None  # the pruned model's states entering it, once they differ from `original`
    layers_info: dict[str, dict] = {}
    for idx, layer in runner.iter_layers(desc=f"{'progressive' if progressive else 'layerwise'} pruning"):
        if idx not in blocks:
            original = runner.forward_all(layer, original)
            pruned = None if pruned is None else runner.forward_all(layer, pruned)
            continue
        adapter, block = blocks[idx]
        moe = adapter.bind(block)
        recorded = runner.recorded(idx)  # set on resume: the layer's forwards run again, its search does not
        if recorded is None:
            scorer = make_search(adapter, block, args.r, args.search, args.exhaustive_limit, args.beam_width,
                                 args.swap_rounds, stats_budget=stats_budget)
        else:  # the same kind of search, to replay the layer's forward (it searches nothing)
            scorer = _Recorded(recorded, search.make_search(adapter, block, args.r, recorded["search"],
                                                            args.exhaustive_limit, args.beam_width, args.swap_rounds))
        outputs = []
        for b, state in enumerate(runner.each(original)):
            if pruned is None:
                # MoE input of the original model: the target is its original routing (method/search.py), and
                # the layer's output, the next layer's input, reuses the scorer's expert outputs
                with scored_forward(moe, scorer):
                    outputs.append(runner.forward(layer, state))
                continue
            # MoE input of the pruned model; the target stays the original model's output
            runner.prefetch(pruned[b])
            with capture_io(block) as io:
                outputs.append(runner.forward(layer, state))
            with scored_forward(moe, scorer, target=io["outputs"][0], discard=True):
                runner.forward(layer, pruned[b])
        info = scorer.result()
        if recorded is None:
            runner.record(idx, info)
        adapter.prune(block, info["kept_experts"])
        logger.info("layer %d: drop %s (loss %.6g; %s search, %d of %d candidates scored%s)", idx,
                    info["dropped_experts"], info["best_loss"], info["search"], info["n_evaluated"],
                    info["n_candidates"], " by an earlier run of this command" if recorded is not None else "")
        layers_info[str(idx)] = info
        # The one difference: progressive feeds the next layers the pruned model's states, layerwise the original's.
        source = pruned or original
        original = outputs
        pruned = runner.forward_all(layer, source) if progressive and idx < last else None
        del source
    next(iter(blocks.values()))[0].prune_config(model.config, args.r)
    info = {"layers": layers_info}
    if getattr(model.config, "betas", None):
        # Betas were calibrated on the unpruned routing; run dynamic_skipping on the pruned model instead.
        del model.config.betas
        info["removed_stale_betas"] = True
        logger.warning("removed `betas` from the config: re-run --method dynamic_skipping on the pruned checkpoint")
    return model, info
