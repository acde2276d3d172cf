"""The scalable search: beam + swap refinement against the exhaustive optimum, and its building blocks."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from transformers import AutoTokenizer

from data import make_loader, read_texts, sample_blocks
from main import RunConfig
from method import METHODS
from method.search import count_drop_sets, drop_sets, rank_bound_mask
from model.adapters import ADAPTERS

from test_families import build, loader


DTYPES = [torch.float32, torch.bfloat16]
# The beam's and the enumeration's loss of the same drop set: the two searches compute the expert outputs
# in differently composed batches (other GEMM shapes), which can move an output by an ulp of its dtype
# (float32: 6e-8; bfloat16: 2^-8, on the few elements whose rounding flips).
SAME_SET_REL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def run(model, calib, search, r, **kw):
    cfg = RunConfig(method="layerwise_pruning", calib_set="c4", model_path="x", r=r, device="cpu",
                    dtype=str(model.dtype).removeprefix("torch."), search=search, **kw)
    return METHODS["layerwise_pruning"](model, calib, cfg)[1]["layers"]


def check_beam_against_enumeration(beam, exhaustive, n_candidates, dtype):
    for layer, ex in exhaustive.items():
        assert ex["n_candidates"] == n_candidates == len(ex["loss"])
        b = beam[layer]
        assert b["search"] == "beam"
        # Same objective: the beam's loss of its set is the exhaustive loss of that set.
        key = ",".join(map(str, b["dropped_experts"]))
        assert b["best_loss"] == pytest.approx(ex["loss"][key], rel=SAME_SET_REL[dtype])
        ratio = b["best_loss"] / ex["best_loss"]
        print(f"layer {layer}: beam/optimum = {ratio:.6f}, rank of beam set among {n_candidates}: "
              f"{sorted(ex['loss'].values()).index(ex['loss'][key]) + 1}")
        assert ratio <= 1.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_beam_finds_the_exhaustive_optimum_16_experts_real_c4(c4_path, tokenizer_dir, dtype):
    """16 experts, r = 8: 12,870 drop sets per layer, enumerated; the beam search must land within 1%."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    calib = make_loader(sample_blocks(read_texts(c4_path), tok, 48, 8, seed=42), 4)
    model = build("mixtral", n_experts=16, dtype=dtype)
    exhaustive = run(copy.deepcopy(model), calib, "exhaustive", 8)
    beam = run(copy.deepcopy(model), calib, "beam", 8)
    assert all(b["n_evaluated"] < 12870 / 4 for b in beam.values())
    check_beam_against_enumeration(beam, exhaustive, 12870, dtype)


@pytest.mark.parametrize("r", [3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_beam_with_tied_router_logits(dtype, r):
    """Every pair of experts has the same router row, so their logits tie on every token: the rank-bound
    mask must hold every expert a candidate can route to whatever the tie-breaking (bf16 used to crash with
    "a candidate routes a token to an expert whose output was not computed")."""
    model = build("mixtral", n_experts=8, dtype=dtype, ties=True)
    calib = loader(n_blocks=4, seq=24, batch=2)
    exhaustive = run(copy.deepcopy(model), calib, "exhaustive", r)
    beam = run(copy.deepcopy(model), calib, "beam", r)
    check_beam_against_enumeration(beam, exhaustive, math.comb(8, r), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_beam_respects_routing_groups(dtype):
    model = build("deepseek_v3", n_experts=16, n_group=4, topk_group=2, dtype=dtype)
    layers = run(model, loader(), "beam", 8)
    for info in layers.values():
        kept = info["kept_experts"]
        assert [sum(e // 4 == g for e in kept) for g in range(4)] == [2, 2, 2, 2]
    assert model.config.n_routed_experts == 8


@pytest.mark.parametrize("dtype,ties", [(torch.float32, False), (torch.bfloat16, True)])
def test_beam_on_64_experts(dtype, ties):
    model = build("qwen3_moe", n_experts=64, top_k=4, dtype=dtype, ties=ties, num_hidden_layers=1)
    layers = run(model, loader(n_blocks=2, seq=32, batch=2), "auto", 32, exhaustive_limit=20000)
    for info in layers.values():
        assert info["search"] == "beam" and len(info["kept_experts"]) == 32
        assert info["n_candidates"] == 1832624140942590534  # C(64, 32)
        assert info["trace"][-1]["best_loss"] >= info["best_loss"] or "swap_round" in info["trace"][-1]
    ids = torch.randint(3, 512, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family,groups", [("mixtral", None), ("deepseek_v3", 2)])
def test_rank_bound_covers_every_candidate_routing(family, groups, dtype, ties):
    """Brute force: the experts any drop set routes a token to lie in the rank-bound mask, also when
    router scores tie (bf16 logits tie for a few % of tokens; with `ties` every pair of experts ties)."""
    model = build(family, n_experts=8, dtype=dtype, ties=ties)
    adapter = ADAPTERS[family]
    block = next(m for m in model.modules() if adapter.matches(m))
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits = adapter.router_logits(block, x)
    if ties:
        assert torch.equal(logits[:, 1::2], logits[:, 0::2])
    g = adapter.expert_groups(block)
    assert (g is None) == (groups is None)
    for r in adapter.valid_r(block):
        mask = rank_bound_mask(adapter.choice_scores(block, logits), 8 - r, adapter.top_k(block), g)
        drops = drop_sets(8, r, g)
        assert len(drops) == count_drop_sets(8, r, g)
        for d in drops:
            kept = torch.tensor([e for e in range(8) if e not in d])
            _, idx = adapter.route(block, logits, kept)
            assert mask.gather(1, idx).all(), (r, d)


def test_rank_bound_includes_ties_made_by_the_softmax_rounding():
    """Logits 0 and 1e-9 differ, but exp(l - 10) rounds both to the same float32: the router (softmax over the
    kept experts, then top-k) may then pick the lower logit, which is 4th of 4, outside the top n_drop + k = 3."""
    model = build("mixtral", n_experts=4)
    adapter = ADAPTERS["mixtral"]
    block = next(m for m in model.modules() if adapter.matches(m))
    logits = torch.tensor([[0.0, 1e-9, 10.0, 5.0]])
    mask = rank_bound_mask(adapter.choice_scores(block, logits), 1, 2, None)
    routed = set()
    for d in drop_sets(4, 3):
        _, idx = adapter.route(block, logits, torch.tensor([e for e in range(4) if e not in d]))
        routed |= set(idx[0].tolist())
        assert mask.gather(1, idx).all(), d
    assert 0 in routed  # the case this test is about does occur


def test_drop_sets_with_groups_are_balanced():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    sets = drop_sets(8, 4, groups)
    assert len(sets) == 36 == count_drop_sets(8, 4, groups)
    assert all(sum(e < 4 for e in d) == 2 for d in sets)
    assert drop_sets(6, 4) == list(itertools.combinations(range(6), 2))


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_masked_group_routing_agrees_with_pruned_routing_on_balanced_sets(family):
    """The beam's rule for unequal groups, applied to balanced sets, picks what the pruned block picks."""
    model = build(family, n_experts=8)
    adapter = ADAPTERS[family]
    block = next(m for m in model.modules() if adapter.matches(m))
    logits = adapter.router_logits(block, torch.randn(100, 32, generator=torch.Generator().manual_seed(2)))
    kept = torch.tensor([[e for e in range(8) if e not in d] for d in drop_sets(8, 4, adapter.expert_groups(block))])
    w_exact, i_exact = adapter.route(block, logits, kept)
    w_mask, i_mask = adapter._route_masked(block, logits, kept)
    order_e, order_m = i_exact.argsort(-1), i_mask.argsort(-1)
    assert torch.equal(i_exact.gather(-1, order_e), i_mask.gather(-1, order_m))
    torch.testing.assert_close(w_exact.gather(-1, order_e), w_mask.gather(-1, order_m), rtol=1e-6, atol=1e-7)
    # Unbalanced sets (one group lost more experts) route only to kept experts.
    unbalanced = torch.tensor([[2, 3, 4, 5, 6, 7], [1, 3, 4, 5, 6, 7]])
    _, idx = adapter.route(block, logits, unbalanced)
    for c in range(2):
        assert set(idx[c].unique().tolist()) <= set(unbalanced[c].tolist())
