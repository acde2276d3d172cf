"""Layer-wise and progressive pruning against brute force, on tiny random Mixtral models and real C4 text."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import make_loader, read_texts, sample_blocks
from main import RunConfig
from method import METHODS
from model.adapters import find_moe_blocks
from model.runner import LayerRunner, capture_io

from reference import best, brute_force_layerwise, brute_force_progressive, record_moe_io
from test_families import check_decision, loss_tolerance, tie_router_rows


def calib(tokenizer_dir, c4_path, n_blocks=8, block_size=48, batch_size=4):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = sample_blocks(read_texts(c4_path), tok, block_size, n_blocks, seed=42)
    loader = make_loader(blocks, batch_size)
    return loader, [b["input_ids"] for b in loader]


def cfg(method, r, path, dtype="float32"):
    return RunConfig(method=method, calib_set="c4", model_path=str(path), r=r, device="cpu", dtype=dtype)


def load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("dtype,ties", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("r", [6, 4])
@pytest.mark.parametrize("method,reference", [("layerwise_pruning", brute_force_layerwise),
                                              ("progressive_pruning", brute_force_progressive)])
def test_fast_search_equals_brute_force(tiny_mixtral, tokenizer_dir, c4_path, method, reference, r, dtype, ties):
    """ties: every pair of experts gets the same router row (their logits tie on every token)."""
    loader, batches = calib(tokenizer_dir, c4_path)
    model = load(tiny_mixtral, dtype)
    if ties:
        tie_router_rows(model)
    expected = reference(copy.deepcopy(model), batches, r)
    z_norm = {l: sum(torch.linalg.norm(z.double().reshape(-1)).item() for _, z in io)
              for l, io in enumerate(record_moe_io(model, batches))}
    _, info = METHODS[method](model, loader, cfg(method, r, tiny_mixtral, str(dtype).removeprefix("torch.")))
    assert set(info["layers"]) == {str(l) for l in expected}
    for l, ref_losses in expected.items():
        got = info["layers"][str(l)]
        tol = loss_tolerance(dtype, z_norm[l])
        if dtype == torch.float32:
            assert got["dropped_experts"] == list(best(ref_losses)), f"layer {l}"
        else:  # the brute force's own bf16 rounding can reorder near ties: checked in check_decision
            check_decision(got["dropped_experts"], ref_losses, tol, l)
        assert got["kept_experts"] == [e for e in range(8) if e not in got["dropped_experts"]]
        assert len(got["loss"]) == len(ref_losses)
        for drop, ref in ref_losses.items():
            assert got["loss"][",".join(map(str, drop))] == pytest.approx(ref, **tol), (l, drop)
    # The pruned blocks really hold r experts, and the config says so.
    for adapter, block in find_moe_blocks(model).values():
        assert adapter.num_experts(block) == r
        assert block.gate.weight.shape[0] == r and block.experts.gate_up_proj.shape[0] == r
    assert model.config.num_local_experts == r


def test_progressive_scores_later_layers_on_the_pruned_model(tiny_mixtral, tokenizer_dir, c4_path):
    """Layer 0 sees the same inputs in both methods. Layer 1 is scored, against the original model's
    outputs, on the original model's inputs (layerwise) or on those of the model whose layer 0 is already
    pruned (progressive): each method's layer-1 losses must be the brute force on its own inputs."""
    from reference import brute_force_layer, pruned_mixtral_moe

    loader, batches = calib(tokenizer_dir, c4_path)
    _, lw = METHODS["layerwise_pruning"](load(tiny_mixtral), loader, cfg("layerwise_pruning", 4, tiny_mixtral))
    _, pg = METHODS["progressive_pruning"](load(tiny_mixtral), loader, cfg("progressive_pruning", 4, tiny_mixtral))
    assert lw["layers"]["0"]["loss"] == pg["layers"]["0"]["loss"]  # the same computation: exact

    original = load(tiny_mixtral)
    io = record_moe_io(original, batches)
    dropped0 = tuple(pg["layers"]["0"]["dropped_experts"])
    hook = original.model.layers[0].mlp.register_forward_hook(lambda m, a, o: pruned_mixtral_moe(m, a[0], dropped0))
    try:
        io_pruned0 = record_moe_io(original, batches)
    finally:
        hook.remove()
    block, targets = original.model.layers[1].mlp, [z for _, z in io[1]]
    expected = {"layerwise": brute_force_layer(block, [x for x, _ in io[1]], targets, 4),
                "progressive": brute_force_layer(block, [x for x, _ in io_pruned0[1]], targets, 4)}
    for name, info in (("layerwise", lw), ("progressive", pg)):
        got = info["layers"]["1"]["loss"]
        assert set(got) == {",".join(map(str, d)) for d in expected[name]}
        for drop, ref in expected[name].items():
            assert got[",".join(map(str, drop))] == pytest.approx(ref, rel=1e-6), (name, drop)
    # The two references are far apart (inputs differ), so each comparison above tells the methods apart.
    assert max(abs(expected["progressive"][d] / expected["layerwise"][d] - 1) for d in expected["layerwise"]) > 1e-2


@pytest.mark.parametrize("method", ["layerwise_pruning", "progressive_pruning"])
def test_keeping_every_expert_changes_nothing(tiny_mixtral, tokenizer_dir, c4_path, method):
    loader, batches = calib(tokenizer_dir, c4_path)
    original = load(tiny_mixtral)
    pruned, info = METHODS[method](copy.deepcopy(original), loader, cfg(method, 8, tiny_mixtral))
    assert all(v["dropped_experts"] == [] for v in info["layers"].values())
    with torch.no_grad():  # every expert kept: the same weights through the same kernels, exact
        for batch in batches:
            assert torch.equal(pruned(input_ids=batch).logits, original(input_ids=batch).logits)


def test_runner_moe_io_equals_full_forward(tiny_mixtral, tokenizer_dir, c4_path):
    loader, batches = calib(tokenizer_dir, c4_path)
    model = load(tiny_mixtral)
    expected = record_moe_io(model, batches)
    runner = LayerRunner(model, "cpu", progress=False)
    states = runner.capture(loader)
    blocks = find_moe_blocks(model)
    for idx, layer in runner.iter_layers(desc="test"):
        new_states = []
        for b, state in enumerate(states):
            with capture_io(blocks[idx][1]) as io:
                new_states.append(runner.forward(layer, state))
            x_ref, z_ref = expected[idx][b]
            # The same layer modules on the same batch (same shapes, same kernels): exact.
            torch.testing.assert_close(io["inputs"][0], x_ref, rtol=0, atol=0)
            torch.testing.assert_close(io["outputs"][0], z_ref, rtol=0, atol=0)
        states = new_states


def test_pruned_model_equals_the_original_without_the_dropped_experts(tiny_mixtral, tokenizer_dir, c4_path):
    """The pruned model computes what the search scored: the original model whose routers leave the
    dropped experts out."""
    from reference import pruned_mixtral_moe

    loader, batches = calib(tokenizer_dir, c4_path)
    original = load(tiny_mixtral)
    pruned, info = METHODS["layerwise_pruning"](copy.deepcopy(original), loader,
                                                cfg("layerwise_pruning", 5, tiny_mixtral))
    handles = [layer.mlp.register_forward_hook(
        lambda m, a, o, d=tuple(info["layers"][str(l)]["dropped_experts"]): pruned_mixtral_moe(m, a[0], d))
        for l, layer in enumerate(original.model.layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                torch.testing.assert_close(pruned(input_ids=batch).logits, original(input_ids=batch).logits,
                                           rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()
