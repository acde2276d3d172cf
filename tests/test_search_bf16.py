"""The fast search in bfloat16 against the paper's algorithm, on the bundled demo model (a trained
Mixtral-architecture MoE: 4 layers, 8 experts, top-2)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import make_loader, read_texts, sample_blocks
from main import RunConfig
from method import METHODS

from conftest import C4, DEMO, shared_path
from reference import best, brute_force_layer, moe_blocks, record_moe_io

# The brute force rounds Z and each Z_D to bfloat16 (2^-9 relative per element, a few roundings per
# element), and its loss is made of the tokens whose routing the drop set changes, where |Z_t - Z_D,t|
# is of the order of |Z_t|: its loss is within about 2^-8 of the exact one (measured: 0.14%). We allow
# 2^-7, plus 1e-3 for the drop sets that change no token's routing (exact loss 0), half a bf16 ulp of a
# median element of Z here (|Z| ~ 0.36, ulp 2^-9). The fast search computes the exact loss of the same
# expert outputs (float64, its target being the float64 sum of the original routing), so a token whose
# routing a drop set leaves as it is adds 0; scored against the bf16-rounded Z it added that rounding for
# every drop set and token (0.31 for a drop set that reroutes no token).
REL, ABS = 2 ** -7, 1e-3


@pytest.fixture(scope="module")
def demo_bf16():
    """The demo model in bfloat16 (its default experts kernel for everything, so that Z and the brute
    force's Z_D come out of the same kernel, as in the paper's code), 8 C4 blocks of 32 tokens in
    batches of 4, and every layer's MoE inputs and outputs of one full-model forward."""
    tok = AutoTokenizer.from_pretrained(DEMO)
    blocks = sample_blocks(read_texts(shared_path(C4))[:128], tok, 32, 8, seed=0)
    loader = make_loader(blocks, 4)
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.bfloat16).eval()
    return model, loader, record_moe_io(model, [b["input_ids"] for b in loader])


@pytest.mark.parametrize("r", range(2, 8))
def test_layerwise_bf16_decisions_equal_the_papers_brute_force(demo_bf16, r):
    """The paper's algorithm: for each drop set, the dropped experts' router logits set to -inf and the
    library's experts module run in bfloat16, loss = sum over batches of ||Z - Z_D||_F in float64."""
    model, loader, io = demo_bf16
    cfg = RunConfig(method="layerwise_pruning", calib_set="c4", model_path=str(DEMO), r=r, device="cpu",
                    dtype="bfloat16", search="exhaustive")
    _, info = METHODS["layerwise_pruning"](copy.deepcopy(model), loader, cfg)
    for layer, block in enumerate(moe_blocks(model)):
        ref = brute_force_layer(block, [x for x, _ in io[layer]], [z for _, z in io[layer]], 8 - r)
        got = info["layers"][str(layer)]
        ours = {tuple(map(int, k.split(","))): v for k, v in got["loss"].items()}
        assert set(ours) == set(ref)
        for d in ref:
            assert ours[d] == pytest.approx(ref[d], rel=REL, abs=ABS), (r, layer, d)
        chosen, expected = tuple(got["dropped_experts"]), best(ref)
        if chosen != expected:
            # Accepted only when the brute force cannot tell the two apart: its losses of them are within
            # its own bf16 noise of each other (checked, not assumed).
            margin = ref[chosen] - ref[expected]
            assert margin <= REL * ref[expected] + ABS, (r, layer, chosen, expected, margin)
            print(f"r={r} layer {layer}: {chosen} instead of {expected}, brute-force losses {margin:.2e} apart")
