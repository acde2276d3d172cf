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

import logging

import torch

from model.adapters import find_moe_blocks
from model.runner import LayerRunner, capture_io

from .search import make_search

logger = logging.getLogger(__name__)


def layerwise_pruning(model, calib_loader, args):
    return _prune(model, calib_loader, args, progressive=False)


def progressive_pruning(model, calib_loader, args):
    return _prune(model, calib_loader, args, progressive=True)


class _Recorded:
    """Stands in for the search on a layer that a killed run of the same command finished: its result."""

    def __init__(self, info: dict):
        self.info = info

    def add_batch(self, *_) -> None:
        pass

    def result(self) -> dict:
        return self.info


def check_r(model, r: int) -> dict:
    """Raise a clear error unless every MoE block can keep r experts; return the blocks."""
    blocks = find_moe_blocks(model)
    for adapter, block in blocks.values():
        adapter.check_r(block, r)
    return blocks


@torch.no_grad()
def _prune(model, calib_loader, args, progressive: bool):
    if args.r is None:
        raise ValueError("pruning methods need --r, the number of experts to keep per MoE layer")
    blocks = check_r(model, args.r)
    runner = LayerRunner(model, args.device)
    last = len(runner.layers) - 1
    original = runner.capture(calib_loader)  # the unpruned model's states entering the current layer
    pruned = None  # the pruned model's states entering it, once they differ from `original`
    layers_info: dict[str, dict] = {}
    for idx, layer in runner.iter_layers(desc=f"{'progressive' if progressive else 'layerwise'} pruning"):
        if idx not in blocks:
            original = [runner.forward(layer, b) for b in original]
            pruned = None if pruned is None else [runner.forward(layer, b) for b in pruned]
            continue
        adapter, block = blocks[idx]
        recorded = runner.recorded(idx)  # set on resume: the layer's forwards run again, its search does not
        scorer = (_Recorded(recorded) if recorded is not None else
                  make_search(adapter, block, args.r, args.search, args.exhaustive_limit, args.beam_width,
                              args.swap_rounds))
        outputs = []
        for b, state in enumerate(original):
            with capture_io(block) as io:
                outputs.append(runner.forward(layer, state))
            x, target = io["inputs"][0], None  # target: the original routing of x (method/search.py)
            if pruned is not None:  # MoE input of the pruned model; the target stays the original model's output
                target = io["outputs"][0]
                with capture_io(block) as io:
                    runner.forward(layer, pruned[b])
                x = io["inputs"][0]
            scorer.add_batch(x, target)
        info = scorer.result()
        if recorded is None:
            runner.record(idx, info)
        adapter.prune(block, info["kept_experts"])
        logger.info("layer %d: drop %s (loss %.6g; %s search, %d of %d candidates scored%s)", idx,
                    info["dropped_experts"], info["best_loss"], info["search"], info["n_evaluated"],
                    info["n_candidates"], " by an earlier run of this command" if recorded is not None else "")
        layers_info[str(idx)] = info
        # The one difference: progressive feeds the next layers the pruned model's states, layerwise the original's.
        pruned = [runner.forward(layer, b) for b in pruned or original] if progressive and idx < last else None
        original = outputs
    next(iter(blocks.values()))[0].prune_config(model.config, args.r)
    info = {"layers": layers_info}
    if getattr(model.config, "betas", None):
        # Betas were calibrated on the unpruned routing; run dynamic_skipping on the pruned model instead.
        del model.config.betas
        info["removed_stale_betas"] = True
        logger.warning("removed `betas` from the config: re-run --method dynamic_skipping on the pruned checkpoint")
    return model, info
