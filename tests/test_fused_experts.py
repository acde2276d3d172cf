"""The decode path of issue #9 on the CPU: the fused experts' semantics against the library's eager
experts (every family whose experts the kernels cover, pruned and skipping), the Triton kernels
themselves under TRITON_INTERPRET=1 against that reference, the skip kernel against the torch rule,
and the static-cache decoder against `generate`. The GPU side (the kernels compiled, CUDA graphs) is
scripts/gpu_decode_check.py, run on an H200 (docs/results/h200/decode_check.json)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import DEMO
from families import FAMILIES, family_config
from model.adapters import find_moe_blocks
from model.fused_experts import fused_experts_reference, supports_fused



def _experts(family: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family)).to(dtype).eval()
    adapter, block = next(iter(find_moe_blocks(model).values()))
    experts = adapter.experts(block)
    with torch.no_grad():  # std 0.02 init gives outputs ~1e-4: scale up so a tolerance means something
        for p in experts.parameters():
            p.normal_(0, 0.2)
    return adapter, block, experts


def _routing(t: int, k: int, e: int, gen: torch.Generator):
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen).softmax(-1)
    return idx, w


COVERED = [f for f in FAMILIES if f != "gpt_oss"]  # GPT-OSS: transposed, interleaved gate/up with clamping


def test_gpt_oss_is_not_covered_and_runs_the_library_code():
    _, _, experts = _experts("gpt_oss", torch.float32)
    assert not supports_fused(experts)
    for fam in COVERED:
        assert supports_fused(_experts(fam, torch.float32)[2]), fam


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", COVERED)
def test_reference_matches_library_eager_experts(family, dtype):
    """Same routed output as the library's eager loop, also after pruning and with skipped slots."""
    adapter, block, experts = _experts(family, dtype)
    eager = type(experts).forward.__wrapped__
    gen = torch.Generator().manual_seed(1)
    for prune in (False, True):
        if prune:
            groups = adapter.expert_groups(block)
            adapter.prune(block, [0, 2, 3, 5, 6, 7] if groups is None else _balanced_keep(groups))
        e, k = adapter.num_experts(block), adapter.top_k(block)
        x = torch.randn(7, experts.gate_up_proj.shape[-1], generator=gen).to(dtype)
        idx, w = _routing(7, k, e, gen)
        skipped_idx = idx.clone()
        skipped_idx[::2, -1] = e  # a skipped slot: the "no expert" sentinel, weight 0
        skipped_w = w.clone()
        skipped_w[::2, -1] = 0.0
        for ii, ww in ((idx, w), (skipped_idx, skipped_w)):
            ref = fused_experts_reference(x, ii, ww, experts.gate_up_proj, experts.down_proj)
            lib = eager(experts, x, ii.clamp(max=e - 1), ww)  # the library: a sentinel slot as a weight-0 slot
            # The library rounds the projections to the model dtype and (bf16) adds slots in bf16; the reference
            # accumulates in float32: a few bf16 ulps of the output (2^-8 relative each), float32 rounding otherwise.
            tol = dict(atol=3e-2 * lib.abs().max().item(), rtol=3e-2) if dtype == torch.bfloat16 else dict(
                atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ref.float(), lib.float(), **tol)


def _balanced_keep(groups):
    """Keep all but one expert per routing group (group-limited families keep equal groups)."""
    return sorted(e for g in groups for e in g[1:])


@pytest.fixture
def interpret():
    """The Triton kernels in the interpreter (numpy on the CPU; tests/conftest.py sets the flag)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is visible: the kernels are checked there by scripts/gpu_decode_check.py")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,e", [(1, 2, 8), (5, 2, 8), (16, 2, 8), (3, 8, 16), (1, 2, 4)])
def test_triton_kernels_match_reference(interpret, t, k, e, dtype):
    from model.fused_experts import fused_experts_triton

    gen = torch.Generator().manual_seed(t * 100 + k)
    h, i = 48, 80  # not multiples of the tiles: masked edges
    x = torch.randn(t, h, generator=gen).to(dtype)
    gu = (torch.randn(e, 2 * i, h, generator=gen) * 0.2).to(dtype)
    d = (torch.randn(e, h, i, generator=gen) * 0.2).to(dtype)
    idx, w = _routing(t, k, e, gen)
    idx[0, -1] = e  # sentinel
    w[0, -1] = 0.0
    if t > 1:
        w[1, 0] = 0.0  # a zero weight on a real expert: skipped as well
    got = fused_experts_triton(x, idx, w, gu, d)
    ref = fused_experts_reference(x, idx, w, gu, d)
    # Same float32 arithmetic up to summation order; bf16: the act buffer and the output round to bf16 (2^-8).
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2 * ref.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    # A token whose every slot is skipped gets exactly zero.
    idx2, w2 = idx.clone(), w.clone()
    idx2[0] = e
    w2[0] = 0.0
    assert torch.count_nonzero(fused_experts_triton(x, idx2, w2, gu, d)[0]) == 0


def test_kernels_read_no_weight_of_an_unused_expert(interpret):
    """NaN weights in every expert nobody is routed to must not reach the output."""
    from model.fused_experts import fused_experts_triton

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, generator=gen)
    gu, d = torch.randn(8, 64, 32, generator=gen), torch.randn(8, 32, 32, generator=gen)
    idx = torch.tensor([[1, 4], [4, 8]])  # expert 8 = sentinel
    w = torch.tensor([[0.6, 0.4], [1.0, 0.0]])
    unused = [e for e in range(8) if e not in (1, 4)]
    gu[unused] = float("nan")
    d[unused] = float("nan")
    out = fused_experts_triton(x, idx, w, gu, d)
    assert torch.isfinite(out).all()
    ref = fused_experts_reference(x, idx, w, gu, d)
    # float32, other summation order over 32-64 terms: ~n * 2^-24 of the largest magnitude
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("k,renorm", [(2, True), (4, True), (4, False), (8, True)])
def test_skip_kernel_matches_torch_rule(interpret, k, renorm):
    from model.dynamic_skipping import skip_kernel, skip_rule

    gen = torch.Generator().manual_seed(k)
    t, e = 37, 16
    w = torch.rand(t, k, generator=gen).softmax(-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True) * 2.5  # a routed_scaling_factor: kept weights keep this total
    idx, _ = _routing(t, k, e, gen)
    # The router's choice scores rank the slots; half the rows rank them otherwise than the weights do
    # (DeepSeek-V3's score-correction bias does that).
    scores = torch.where(torch.arange(t)[:, None] % 2 == 0, w, torch.rand(t, k, generator=gen))
    betas = torch.rand(k - 1, generator=gen)
    counts = torch.zeros(2, dtype=torch.long)
    w2, i2 = skip_kernel(w, scores, idx, betas, e, renorm, 2.5, counts)
    skip = skip_rule(w, scores, betas)
    assert torch.equal(i2, idx.masked_fill(skip, e))  # decisions: exact
    ref = w.masked_fill(skip, 0.0)
    if renorm:  # hand-written: rows with a skip rescaled to the router's total, 2.5
        ref = torch.where(skip.any(-1, keepdim=True), ref / ref.sum(-1, keepdim=True) * 2.5, w)
    torch.testing.assert_close(w2, ref, atol=1e-6, rtol=1e-6)
    assert counts.tolist() == [t, int(skip.sum())]
    assert 0 < int(skip.sum()) < t * (k - 1)  # the test exercises both outcomes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skipping", [False, True])
def test_static_decoder_equals_generate(dtype, skipping):
    """The benchmark's graph engine minus the graph: the same greedy tokens as generate on the trained demo
    model, left padding included, skipping on and off, up to each sequence's first near-tie of the reference
    (model.static_decode.GREEDY_TIE_MARGIN: the demo model has exact ties in bfloat16, where either token is right)."""
    from model import DynamicSkipping
    from model.static_decode import StaticDecoder
    from conftest import GREEDY_TIE_MARGIN, assert_same_greedy_tokens, greedy_reference

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=dtype).eval()
    model.set_experts_implementation("fused")  # the reference path on the CPU
    if skipping:
        DynamicSkipping(model, {str(i): 0.6 for i in range(model.config.num_hidden_layers)}).enable()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (16, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    ref, scores = greedy_reference(model, ids, mask, 12)
    eos = model.generation_config.eos_token_id
    dec = StaticDecoder(model, 16, 24, graph=False, banned_token_ids=(eos,))
    # at least 32 of the 192 steps before a tie (measured: 68-70 in bfloat16, 187-192 in float32)
    out, _ = dec.generate(ids, mask, 12)
    assert_same_greedy_tokens(out, ref, scores, GREEDY_TIE_MARGIN[dtype], min_compared=32)
    out2, _ = dec.generate(ids, mask, 12)  # buffers and cache reset between prompts: the same computation again
    assert torch.equal(out2, out)


def test_static_decoder_refuses_graphs_on_cpu():
    from model.static_decode import StaticDecoder

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, 1, 8, graph=True)


def test_greedy_comparison_allows_only_ties_to_differ():
    """conftest.assert_same_greedy_tokens, on hand-made scores: step 0 is clear, step 1 a three-way tie."""
    from conftest import assert_same_greedy_tokens

    scores = (torch.tensor([[0.0, 5.0, 4.5, 0.0]]), torch.tensor([[3.0, 3.0, 3.0, 0.0]]),
              torch.tensor([[0.0, 0.0, 0.0, 9.0]]))
    ref = torch.tensor([[1, 0, 3]])
    m = (0.1, 0.0)
    assert_same_greedy_tokens(ref, ref, scores, m, min_compared=1)
    assert_same_greedy_tokens(torch.tensor([[1, 2, 0]]), ref, scores, m, min_compared=1)  # tied, then apart
    with pytest.raises(AssertionError):
        assert_same_greedy_tokens(torch.tensor([[2, 0, 3]]), ref, scores, m, min_compared=1)  # a clear step
    with pytest.raises(AssertionError):
        assert_same_greedy_tokens(torch.tensor([[1, 3, 3]]), ref, scores, m, min_compared=1)  # not a tied token
    with pytest.raises(AssertionError, match="before a tie"):
        assert_same_greedy_tokens(ref, ref, scores, m, min_compared=2)
    # relative margin: a gap of 0.5 under a top logit of 5 is a tie at 25% (slack 1.25), not at 5% (0.25)
    assert_same_greedy_tokens(torch.tensor([[2, 0, 3]]), ref, scores, (0.0, 0.25), min_compared=0)
    with pytest.raises(AssertionError):
        assert_same_greedy_tokens(torch.tensor([[2, 0, 3]]), ref, scores, (0.0, 0.05), min_compared=0)
