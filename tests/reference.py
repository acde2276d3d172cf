"""Independent references for the tests: brute force over every drop set with full block forwards.

Nothing here uses the project's search, routing or pruning code: the reference routes with
Mixtral's own softmax/top-k rule over the kept experts' router logits and runs the library's
experts module, once per candidate, as the paper's enumeration does.

The paper's code removes the dropped experts by setting their logits to -inf; here their logits
are left out (the router sliced), which is what the pruned block computes. The two give the same
routing except on exact ties (frequent in bfloat16): torch.topk breaks a tie between equal
probabilities differently over E columns holding -inf than over the r kept columns.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def pruned_mixtral_moe_many(block, x: torch.Tensor, drops) -> torch.Tensor:
    """Mixtral MoE block output with the experts of each drop set removed from the router, for several
    drop sets in one call of the library's experts module (the tokens repeated once per drop set):
    (C, *x.shape)."""
    shape = x.shape
    h = x.reshape(-1, shape[-1])
    n = block.gate.weight.shape[0]
    kept = torch.tensor([[e for e in range(n) if e not in set(d)] for d in drops]).view(len(drops), -1)  # (C, r)
    logits = F.linear(h, block.gate.weight)[:, kept].permute(1, 0, 2)  # (C, T, r): the kept experts' logits
    probs = torch.softmax(logits.float(), dim=-1)
    w, i = torch.topk(probs, block.gate.top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    i = torch.gather(kept.unsqueeze(1).expand(-1, i.shape[1], -1), -1, i)  # original expert numbers
    out = block.experts(h.repeat(len(drops), 1), i.reshape(-1, i.shape[-1]), w.reshape(-1, w.shape[-1]))
    return out.reshape(len(drops), *shape)


def pruned_mixtral_moe(block, x: torch.Tensor, dropped) -> torch.Tensor:
    """Mixtral MoE block output with experts `dropped` removed from the router."""
    return pruned_mixtral_moe_many(block, x, [tuple(dropped)])[0]


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


def brute_force_layer(block, xs, targets, n_drop: int, per_call: int = 256):
    """{drop tuple: sum over batches of ||target - block without the dropped experts(x)||_F} in float64.

    `per_call` drop sets share one call of the experts module (pruned_mixtral_moe_many): the same
    per-token computation, in fewer and larger kernel calls."""
    n = block.gate.weight.shape[0]
    drops = list(itertools.combinations(range(n), n_drop))
    losses = dict.fromkeys(drops, 0.0)
    with torch.no_grad():
        for c0 in range(0, len(drops), per_call):
            chunk = drops[c0:c0 + per_call]
            for x, z in zip(xs, targets):
                out = pruned_mixtral_moe_many(block, x, chunk)  # (C, *x.shape)
                diff = (z.double().unsqueeze(0) - out.double()).reshape(len(chunk), -1)
                for d, norm in zip(chunk, torch.linalg.norm(diff, dim=-1).tolist()):
                    losses[d] += norm
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
    already pruned (emulated through forward hooks), targets from the original model."""
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
                lambda m, a, o, d=decisions[l]: pruned_mixtral_moe(m, a[0], d)))
    finally:
        for h in handles:
            h.remove()
    return out
