"""Independent references for the tests: brute force over every drop set with full block forwards.

Nothing here uses the project's search, routing or pruning code: the reference routes with the
dropped experts' logits masked to -inf inside Mixtral's own softmax/top-k rule and runs the
library's experts module, once per candidate, exactly as the paper's enumeration does.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def masked_mixtral_moe(block, x: torch.Tensor, dropped) -> torch.Tensor:
    """Mixtral MoE block output with experts `dropped` removed from the router (logits -> -inf)."""
    shape = x.shape
    h = x.reshape(-1, shape[-1])
    logits = F.linear(h, block.gate.weight)
    if dropped:
        logits[:, list(dropped)] = float("-inf")
    probs = torch.softmax(logits.float(), dim=-1)
    w, i = torch.topk(probs, block.gate.top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return block.experts(h, i, w).reshape(shape)


def moe_blocks(model):
    return [layer.mlp for layer in model.model.layers]


@torch.no_grad()
def record_moe_io(model, batches):
    """Per layer, per batch: (MoE input, MoE output) of one full-model forward."""
    blocks = moe_blocks(model)
    rec = [[] for _ in blocks]
    handles = [b.register_forward_hook(lambda m, a, o, i=i: rec[i].append((a[0].detach().clone(),
                                                                            o.detach().clone())))
               for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return rec


def brute_force_layer(block, xs, targets, n_drop: int):
    """{drop tuple: sum over batches of ||target - masked block(x)||_F} in float64."""
    n = block.gate.weight.shape[0]
    losses = {}
    for dropped in itertools.combinations(range(n), n_drop):
        loss = 0.0
        for x, z in zip(xs, targets):
            out = masked_mixtral_moe(block, x, dropped)
            loss += torch.linalg.norm((z.double() - out.double()).reshape(-1)).item()
        losses[dropped] = loss
    return losses


def best(losses: dict):
    keys = list(losses)
    return min(keys, key=lambda k: (losses[k], keys.index(k)))


@torch.no_grad()
def brute_force_layerwise(model, batches, r: int):
    """Layer-wise pruning by brute force on the original model's activations: {layer: losses}."""
    io = record_moe_io(model, batches)
    n = moe_blocks(model)[0].gate.weight.shape[0]
    return {l: brute_force_layer(b, [x for x, _ in io[l]], [z for _, z in io[l]], n - r)
            for l, b in enumerate(moe_blocks(model))}


@torch.no_grad()
def brute_force_progressive(model, batches, r: int):
    """Progressive pruning by brute force: layer l sees the inputs of the model with layers < l
    already pruned (emulated by masking, through forward hooks), targets from the original model."""
    targets = record_moe_io(model, batches)
    blocks = moe_blocks(model)
    n = blocks[0].gate.weight.shape[0]
    decisions, out = {}, {}
    handles = []
    try:
        for l, block in enumerate(blocks):
            io = record_moe_io(model, batches)  # the partly pruned model's activations
            losses = brute_force_layer(block, [x for x, _ in io[l]], [z for _, z in targets[l]], n - r)
            out[l] = losses
            decisions[l] = best(losses)
            handles.append(block.register_forward_hook(
                lambda m, a, o, d=decisions[l]: masked_mixtral_moe(m, a[0], d)))
    finally:
        for h in handles:
            h.remove()
    return out
