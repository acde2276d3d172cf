"""Baseline pruning criteria (random, frequency, REAP) against hand computations on tiny MoEs.

References use only the library: the routers' own outputs (weights and indices) recorded during one
full-model forward, and the library's experts module run on one token at a time.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

import main
from method import METHODS
from method.baselines import ReapScore, top_r
from model.adapters import find_moe_blocks

from test_families import build, loader, run_cfg

BASELINES = ["random_pruning", "frequency_pruning", "reap_pruning"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GROUPS = {"mixtral": None, "deepseek_v2": [[0, 1, 2, 3], [4, 5, 6, 7]]}  # the tiny configs' routing groups


def model_and_calib(family, dtype):
    return build(family).to(DTYPES[dtype]), loader()


@torch.no_grad()
def router_records(model, calib):
    """Per MoE layer: [(router input (tokens, hidden), weights (tokens, k), indices (tokens, k))] per batch,
    as the library's own routers return them in one full forward of the unpruned model."""
    blocks = find_moe_blocks(model)
    rec = {idx: [] for idx in blocks}

    def hook(idx):
        def fn(mod, args, out):
            x = args[0]
            rec[idx].append((x.reshape(-1, x.shape[-1]).clone(), out[1].clone(), out[2].clone()))
        return fn

    handles = [block.gate.register_forward_hook(hook(idx)) for idx, (_, block) in blocks.items()]
    try:
        for batch in calib:
            model(input_ids=batch["input_ids"])
    finally:
        for h in handles:
            h.remove()
    return rec


def assert_keeps_best(kept, scores, r, groups, tol=0.0):
    """Every group keeps r / n_groups experts, none scoring below a dropped expert of its group (+ tol)."""
    for members in groups or [list(range(len(scores)))]:
        k_in = [e for e in members if e in kept]
        d_in = [e for e in members if e not in kept]
        assert len(k_in) == r // len(groups or [0])
        if k_in and d_in:
            assert min(scores[e] for e in k_in) >= max(scores[e] for e in d_in) - tol, (kept, scores)


def test_top_r_ties_go_to_lower_index_and_groups_keep_equal_counts():
    assert top_r([1.0, 3.0, 3.0, 2.0], 2) == [1, 2]
    assert top_r([5.0, 5.0, 5.0, 5.0], 3) == [0, 1, 2]
    # Groups [0..3], [4..7]: each keeps 2 even though group 2 holds the 3 highest scores overall.
    assert top_r([1, 2, 3, 0, 9, 8, 7, 6], 4, GROUPS["deepseek_v2"]) == [1, 2, 4, 5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", GROUPS)
def test_frequency_counts_equal_library_router(family, dtype):
    model, calib = model_and_calib(family, dtype)
    counts = {idx: Counter() for idx in find_moe_blocks(model)}
    for idx, recs in router_records(model, calib).items():
        for _, _, ind in recs:
            counts[idx].update(ind.reshape(-1).tolist())
    r = 6
    _, info = METHODS["frequency_pruning"](model, calib, run_cfg("frequency_pruning", r))
    for idx, c in counts.items():
        got = info["layers"][str(idx)]
        expected = [c[e] for e in range(8)]
        assert [got["scores"][str(e)] for e in range(8)] == expected  # decisions: exact
        assert got["n_tokens"] == 6 * 24 and sum(expected) == 6 * 24 * 2
        assert got["search"] == "frequency_pruning"
        # Hand ranking: count descending, then lower index, within each routing group.
        groups = GROUPS[family] or [list(range(8))]
        want = sorted(e for g in groups for e in sorted(g, key=lambda e: (-expected[e], e))[: r // len(groups)])
        assert got["kept_experts"] == want
        assert got["dropped_experts"] == [e for e in range(8) if e not in want]
    assert all(adapter.num_experts(block) == r for adapter, block in find_moe_blocks(model).values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", GROUPS)
def test_reap_equals_hand_loop_over_tokens(family, dtype):
    model, calib = model_and_calib(family, dtype)
    blocks = find_moe_blocks(model)
    reference = {}
    with torch.no_grad():
        for idx, recs in router_records(model, calib).items():
            experts = blocks[idx][1].experts
            total, n = [0.0] * 8, [0] * 8
            for x, w, ind in recs:
                for t in range(x.shape[0]):
                    for j in range(ind.shape[1]):
                        e = int(ind[t, j])
                        y = experts(x[t: t + 1], torch.tensor([[e]]), torch.ones(1, 1))  # library expert, weight 1
                        total[e] += float(w[t, j]) * float(y.double().norm())
                        n[e] += 1
            reference[idx] = ([total[e] / n[e] if n[e] else 0.0 for e in range(8)], n)
    r = 4
    _, info = METHODS["reap_pruning"](model, calib, run_cfg("reap_pruning", r))
    # One token at a time vs the method's batched expert call: same math, different GEMM shapes. float32:
    # accumulation-order rounding (~1e-7 relative per output). bfloat16: each expert output is rounded to
    # 8 mantissa bits, so a batched and a single-row GEMM can differ by an ulp (2^-8) per element;
    # averaged over elements and tokens 1e-2 relative is a safe bound.
    rtol = 1e-5 if dtype == "float32" else 1e-2
    for idx, (scores, n) in reference.items():
        got = info["layers"][str(idx)]
        assert got["routed_tokens"] == {str(e): n[e] for e in range(8)}  # routing decisions: exact
        torch.testing.assert_close(torch.tensor([got["scores"][str(e)] for e in range(8)], dtype=torch.float64),
                                   torch.tensor(scores, dtype=torch.float64), rtol=rtol, atol=1e-6)
        assert_keeps_best(got["kept_experts"], scores, r, GROUPS[family], tol=rtol * max(scores))
        assert got["search"] == "reap_pruning"


def test_reap_never_routed_expert_scores_zero():
    model = build("mixtral")
    adapter, block = find_moe_blocks(model)[0]
    v = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    with torch.no_grad():
        block.gate.weight[7] = -100.0 * v  # logit of expert 7 is ~ -100 on tokens near v: never in a top-2
    x = v + 0.01 * torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    scorer = ReapScore(adapter, block)
    scorer.add_batch(x)
    scores, extra = scorer.result()
    assert extra["routed_tokens"]["7"] == 0 and scores[7] == 0.0
    assert sum(extra["routed_tokens"].values()) == 100 and min(s for e, s in enumerate(scores) if extra["routed_tokens"][str(e)]) > 0


def expected_random_kept(seed, n_layers, n, r, groups):
    """The documented rule: random.Random(seed), n uniform keys per MoE layer in layer order, keep the r
    largest keys (r / n_groups per routing group)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_layers):
        keys = [rng.random() for _ in range(n)]
        kept = []
        for g in groups or [list(range(n))]:
            kept += sorted(g, key=lambda e: keys[e], reverse=True)[: r // len(groups or [0])]
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("family", GROUPS)
def test_random_is_seeded_and_respects_groups(family):
    def kept(seed):
        _, info = METHODS["random_pruning"](build(family), None, run_cfg("random_pruning", 4, seed=seed))
        assert all(v["search"] == "random_pruning" for v in info["layers"].values())
        return [info["layers"][k]["kept_experts"] for k in sorted(info["layers"], key=int)]

    first = kept(42)
    assert first == expected_random_kept(42, 2, 8, 4, GROUPS[family])
    assert kept(42) == first  # same seed, same choice
    assert any(kept(s) != first for s in (0, 1, 2))  # other seeds choose differently somewhere
    for layer in first:
        assert_keeps_best(layer, [1.0 if e in layer else 0.0 for e in range(8)], 4, GROUPS[family])


def test_random_keys_choose_every_subset_equally_often():
    """top_r on uniform keys is a uniform r-subset: 7000 draws of C(8,4) = 70 subsets, 100 expected each
    (binomial std ~10); each count within 100 +- 45 (4.5 std; the draws are seeded, so no flakiness)."""
    rng = random.Random(0)
    counts = Counter(tuple(top_r([rng.random() for _ in range(8)], 4)) for _ in range(7000))
    assert len(counts) == 70 and min(counts.values()) > 55 and max(counts.values()) < 145


@pytest.mark.parametrize("method", BASELINES)
def test_grouped_family_prunes_and_reloads(method, tmp_path):
    model = build("deepseek_v2")
    model, info = METHODS[method](model, loader(), run_cfg(method, 6))
    for layer in info["layers"].values():
        assert_keeps_best(layer["kept_experts"], [layer["scores"][str(e)] for e in range(8)], 6,
                          GROUPS["deepseek_v2"])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.config.n_routed_experts == 6
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", BASELINES)
def test_main_end_to_end_loads_in_plain_transformers(method, dtype, tiny_mixtral, c4_path, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--method", method, "--r", "5", "--calib_set", "c4", "--calib_path", str(c4_path),
            "--model_path", str(tiny_mixtral), "--output_path", str(out), "--max_block_size", "48",
            "--n_blocks_for_stat", "8", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--dtype", dtype]
    assert main.main(argv) == 0
    (result,) = list(out.iterdir())
    assert result.name.startswith(f"tiny-mixtral_{method}_r5_c4_8_")
    info = json.loads((result / "pruning_info.json").read_text())
    assert info["args"]["method"] == method and set(info["layers"]) == {"0", "1"}
    for layer in info["layers"].values():
        assert layer["search"] == method and set(layer["scores"]) == {str(e) for e in range(8)}
        assert sorted(layer["kept_experts"] + layer["dropped_experts"]) == list(range(8))
        assert_keeps_best(layer["kept_experts"], [layer["scores"][str(e)] for e in range(8)], 5, None)
        if method != "random_pruning":
            assert layer["n_tokens"] == 8 * 48
    reloaded = AutoModelForCausalLM.from_pretrained(result, dtype=DTYPES[dtype]).eval()
    assert reloaded.config.num_local_experts == 5
    original = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=DTYPES[dtype])
    for l, layer in enumerate(reloaded.model.layers):
        kept = torch.tensor(info["layers"][str(l)]["kept_experts"])
        assert layer.mlp.experts.gate_up_proj.shape[0] == 5
        assert torch.equal(layer.mlp.experts.gate_up_proj, original.model.layers[l].mlp.experts.gate_up_proj[kept])
        assert torch.equal(layer.mlp.gate.weight, original.model.layers[l].mlp.gate.weight[kept])
    with torch.no_grad():
        assert reloaded.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
