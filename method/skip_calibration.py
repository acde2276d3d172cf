"""Dynamic skipping, calibration side (paper Sec. 3.2): `--method dynamic_skipping` computes the betas.

At inference (model/dynamic_skipping.py: the rule, the renormalisation and the hooks) a token
skips its 2nd routed expert when w2 < beta * w1. Per MoE layer, beta is the median of w2 / w1
over all calibration tokens (the mean is recorded too).
The betas are stored in the model config under `betas` ({"<layer>": median}), the key
the original code used, so its checkpoints and ours are read the same way.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from model.adapters import UnsupportedRoutingError, find_moe_blocks
from model.runner import capture_io, layer_runner

logger = logging.getLogger(__name__)


def check_skippable(model) -> dict:
    blocks = find_moe_blocks(model)
    for idx, (adapter, block) in blocks.items():
        if adapter.top_k(block) < 2:
            raise UnsupportedRoutingError(
                f"dynamic skipping drops a token's 2nd..k-th experts; layer {idx} routes each token to one expert")
    return blocks


def weight_ratios(weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(tokens, k) routing weights -> (tokens, k - 1): w_j / w_1 for ranks j = 2..k.

    Ranks are the router's order of choice, given by its choice scores (tokens, k) of the same
    slots, as the skipping rule ranks them (`model.dynamic_skipping.skip_rule`).
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)
    w = weights.float().gather(-1, order)
    return w[..., 1:] / w[..., :1]


@torch.no_grad()
def dynamic_skipping(model, calib_loader, args):
    blocks = check_skippable(model)
    runner = layer_runner(model, args)
    states = runner.capture(calib_loader)
    layers_info: dict[str, dict] = {}
    for idx, layer in runner.iter_layers(desc="dynamic skipping calibration"):
        recorded = runner.recorded(idx) if idx in blocks else None
        if idx not in blocks or recorded is not None:  # recorded: finished by a killed run of this command
            states = runner.forward_all(layer, states)
            if recorded is not None:
                layers_info[str(idx)] = recorded
            continue
        moe = blocks[idx][0].bind(blocks[idx][1])
        ratios = []
        new_states = []
        for b in runner.each(states):
            with capture_io(moe.router()) as io:
                new_states.append(runner.forward(layer, b))
            logits = io["outputs"][0]
            weights, indices = moe.route(logits)  # the router's own rule on its logits
            ratios.append(weight_ratios(weights, moe.chosen_scores(logits, indices)).cpu().numpy())
        states = new_states
        r = np.concatenate(ratios).astype(np.float64)  # (tokens, k - 1)
        median = np.median(r, axis=0)
        # The inference rule skips rank j when w_j < beta_j * w_1, i.e. w_j / w_1 < beta_j: the fraction of
        # calibration tokens that would skip (about one half by the median's definition; less with ties).
        stats = {"beta_median": median.tolist(), "beta_mean": np.mean(r, axis=0).tolist(),
                 "calib_skip_rate": np.mean(r < median, axis=0).tolist()}
        if r.shape[1] == 1:  # top-2: one number per layer, the paper's (and original code's) format
            stats = {k: v[0] for k, v in stats.items()}
        layers_info[str(idx)] = {**stats, "n_tokens": int(r.shape[0])}
        runner.record(idx, layers_info[str(idx)])
        logger.info("layer %d: median w_j/w_1 %s, mean %s, calibration skip rate %s", idx, stats["beta_median"],
                    stats["beta_mean"], stats["calib_skip_rate"])
    model.config.betas = {k: v["beta_median"] for k, v in layers_info.items()}
    return model, {"layers": layers_info}
