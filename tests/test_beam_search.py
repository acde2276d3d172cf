"""The scalable search: beam + swap refinement against a brute-force enumeration, and its building blocks."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from data import make_loader, read_texts, sample_blocks
from main import RunConfig
from method import METHODS
from method.search import count_drop_sets, drop_sets, rank_bound_mask
from model.adapters import ADAPTERS

from reference import moe_blocks, record_moe_io
from test_families import build, loader


DTYPES = [torch.float32, torch.bfloat16]
# The search's and the reference's loss of the same drop set: the two compute the expert outputs in
# differently composed batches (other GEMM shapes), which can move an output by an ulp of its dtype
# (float32: 6e-8; bfloat16: 2^-8, on the few elements whose rounding flips).
SAME_SET_REL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def run(model, calib, search, r, **kw):
    cfg = RunConfig(method="layerwise_pruning", calib_set="c4", model_path="x", r=r, device="cpu",
                    dtype=str(model.dtype).removeprefix("torch."), search=search, **kw)
    return METHODS["layerwise_pruning"](model, calib, cfg)[1]["layers"]


@torch.no_grad()
def reference_losses(block, io, drops) -> torch.Tensor:
    """(C,) float64 L(D) of each drop set D by brute force, from the library's router alone (Mixtral, and
    Qwen3-MoE with norm_topk_prob): none of the project's search or routing code.

    The pruned block's router holds the kept experts' rows, so a token goes to the top-k of the softmax
    over the kept experts' logits, weighted by those probabilities renormalised over the k it picks (in the
    dtype the router returns them). Each expert's output on every token comes from the library's experts
    module; the block output and L(D) = sum over batches of ||target - output||_F are formed in float64.
    A token's output depends only on the experts it goes to, so each distinct (token, experts) routing is
    combined once and shared by the drop sets that make it.
    io: [(MoE input, original MoE output)] per batch, from `reference.record_moe_io`.
    """
    n, k = block.gate.weight.shape[0], block.gate.top_k
    kept = torch.tensor([[e for e in range(n) if e not in d] for d in drops])  # (C, r)
    total = torch.zeros(len(drops), dtype=torch.float64)
    for x, target in io:
        h = x.reshape(-1, x.shape[-1])  # (T, H)
        target = target.reshape(h.shape).double()
        t = h.shape[0]
        logits = F.linear(h, block.gate.weight).float()  # (T, n), as the router computes them
        weight_dtype = block.gate(h)[1].dtype
        ones = torch.ones(t, 1, dtype=h.dtype)
        y = torch.stack([block.experts(h, torch.full((t, 1), e), ones) for e in range(n)]).double()  # (n, T, H)
        picked = torch.empty(len(drops), t, k, dtype=torch.long)  # (C, T, k) experts of each token, sorted
        for c in range(0, len(drops), 1024):
            kc = kept[c:c + 1024]
            probs = torch.softmax(logits[:, kc].transpose(0, 1), dim=-1)  # (c, T, r): the pruned router
            choice = probs.topk(k, dim=-1).indices
            picked[c:c + 1024] = kc[:, None, :].expand(-1, t, -1).gather(-1, choice).sort(dim=-1).values
        # Distinct (token, experts) routings, as base-n numbers: token, then its k experts.
        digits = torch.cat([torch.arange(t).view(1, t, 1).expand(len(drops), t, 1), picked], dim=-1)
        keys, inverse = torch.unique(digits.reshape(-1, k + 1) @ n ** torch.arange(k, -1, -1), return_inverse=True)
        tok = keys // n ** k
        experts = torch.stack([keys // n ** p % n for p in range(k - 1, -1, -1)], dim=-1)  # (U, k)
        w = torch.softmax(logits[tok[:, None], experts].double(), dim=-1).float().to(weight_dtype).double()
        out = (w[..., None] * y[experts, tok[:, None]]).sum(1)  # (U, H)
        sq = (target[tok] - out).pow(2).sum(-1)  # (U,)
        total += sq[inverse].view(len(drops), t).sum(1).sqrt()
    return total


def check_beam_finds_the_optimum(model, calib, beam, r, dtype):
    """Against the brute-force enumeration of every drop set: the beam's set ranks first, and the loss the
    beam reports for it is the reference's."""
    io = record_moe_io(model, [b["input_ids"] for b in calib])
    n = moe_blocks(model)[0].gate.weight.shape[0]
    drops = list(itertools.combinations(range(n), n - r))
    for layer, block in enumerate(moe_blocks(model)):
        b = beam[str(layer)]
        assert b["search"] == "beam"
        ref = reference_losses(block, io[layer], drops)
        i = drops.index(tuple(b["dropped_experts"]))
        assert b["best_loss"] == pytest.approx(float(ref[i]), rel=SAME_SET_REL[dtype])
        rank = int((ref < ref[i]).sum()) + 1
        second = float(ref.sort().values[1] / ref.min())
        print(f"layer {layer}: rank of the beam's set among {len(drops)}: {rank}; 2nd best / best = {second:.6f}")
        # Rank 1, unless the best set's loss is within a set's own noise (SAME_SET_REL) of the beam's: the
        # search ranks sets on its own GEMM shapes, and in bfloat16 the top two can be 1.6e-4 apart (measured),
        # closer than another CPU's rounding can move a loss.
        assert rank == 1 or float(ref[i] - ref.min()) <= SAME_SET_REL[dtype] * float(ref.min()), (layer, rank)


@pytest.mark.parametrize("dtype", DTYPES)
def test_beam_finds_the_exhaustive_optimum_16_experts_real_c4(c4_path, tokenizer_dir, dtype):
    """16 experts, r = 8: 12,870 drop sets per layer; the beam search, which scores under a quarter of
    them, must pick the one the brute-force enumeration ranks first."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    calib = make_loader(sample_blocks(read_texts(c4_path), tok, 48, 8, seed=42), 4)
    model = build("mixtral", n_experts=16, dtype=dtype)
    beam = run(copy.deepcopy(model), calib, "beam", 8)
    assert all(b["n_evaluated"] < 12870 / 4 for b in beam.values())
    check_beam_finds_the_optimum(model, calib, beam, 8, dtype)


@pytest.mark.parametrize("r", [3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_beam_with_tied_router_logits(dtype, r):
    """Every pair of experts has the same router row, so their logits tie on every token: the rank-bound
    mask must hold every expert a candidate can route to whatever the tie-breaking (bf16 used to crash with
    "a candidate routes a token to an expert whose output was not computed")."""
    model = build("mixtral", n_experts=8, dtype=dtype, ties=True)
    calib = loader(n_blocks=4, seq=24, batch=2)
    beam = run(copy.deepcopy(model), calib, "beam", r)
    check_beam_finds_the_optimum(model, calib, beam, r, dtype)


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
    calib = loader(n_blocks=2, seq=32, batch=2)
    model_before = copy.deepcopy(model)
    io = record_moe_io(model_before, [b["input_ids"] for b in calib])
    layers = run(model, calib, "auto", 32, exhaustive_limit=20000)
    for layer, info in layers.items():
        assert info["search"] == "beam" and len(info["kept_experts"]) == 32
        assert info["n_candidates"] == 1832624140942590534  # C(64, 32)
        # C(64, 32) sets cannot be enumerated; the reference scores the beam's set and its 32 * 32 one-swap
        # neighbours. The swap refinement stops where no swap lowers the loss (or after swap_rounds).
        assert info["swap_rounds"] < 4, "the refinement did not settle: the check below would not apply"
        best = tuple(info["dropped_experts"])
        swaps = [tuple(sorted(set(best) - {a} | {b})) for a in best for b in range(64) if b not in best]
        ref = reference_losses(model_before.model.layers[int(layer)].mlp, io[int(layer)], [best, *swaps])
        assert info["best_loss"] == pytest.approx(float(ref[0]), rel=SAME_SET_REL[dtype])
        print(f"layer {layer}: best one-swap neighbour / beam's set = {float(ref[1:].min() / ref[0]):.6f}")
        assert float(ref[1:].min()) >= float(ref[0]) * (1 - SAME_SET_REL[dtype])
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
