"""Issue 11 §2-3: the beam search's statistics under a device-memory budget, the layer forward reusing the
scorer's expert outputs, and the per-layer time profile."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import main
from method import METHODS
from method.pruning import scored_forward
from method.search import BeamSearch, ExhaustiveScorer, rank_bound_mask, stats_bytes_per_token
from model.adapters import find_moe_blocks
from model.profiling import Profile

from families import FAMILIES
from test_cli import common
from test_beam_search import run
from test_families import build, loader, run_cfg

DTYPES = [torch.float32, torch.bfloat16]


def _without_memory(layers: dict) -> dict:
    return {k: {f: v for f, v in info.items() if f != "statistics_memory"} for k, info in layers.items()}


@pytest.mark.parametrize("family,kw,r,dtype,ties", [
    ("mixtral", dict(n_experts=16), 8, torch.float32, False),
    ("mixtral", dict(n_experts=8), 4, torch.bfloat16, True),
    ("deepseek_v3", dict(n_experts=16, n_group=4, topk_group=2), 8, torch.bfloat16, False),
])
def test_statistics_budget_changes_nothing(family, kw, r, dtype, ties):
    """Where the statistics are kept (all on the compute device, one batch there and the rest in host memory, or
    all in host memory) changes nothing: the same decisions, losses and trace, bit for bit. On the CPU the "host"
    batches take the same path as on a GPU (kept apart, copied back for every scoring pass), without pinning."""
    model = build(family, dtype=dtype, ties=ties, **kw)
    calib = loader(n_blocks=6, seq=24, batch=2)  # 3 batches
    everything = run(copy.deepcopy(model), calib, "beam", r)
    memory = next(iter(everything.values()))["statistics_memory"]
    assert memory["batches"] == 3 and memory["batches_on_host"] == 0 and memory["budget_bytes"] is None
    per_batch = memory["bytes"] / 3
    one = run(copy.deepcopy(model), calib, "beam", r, stats_budget_gib=1.5 * per_batch / 2**30)
    none = run(copy.deepcopy(model), calib, "beam", r, stats_budget_gib=0)
    assert _without_memory(one) == _without_memory(everything) == _without_memory(none)
    for info in one.values():
        m = info["statistics_memory"]
        assert m["batches_on_host"] == 2 and m["bytes"] - m["host_bytes"] <= m["budget_bytes"]
    assert all(info["statistics_memory"]["batches_on_host"] == 3 for info in none.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_statistics_take_the_documented_bytes(family, dtype):
    """Each kept batch takes stats_bytes_per_token(E, M, k, ...) bytes per token, with and without the original
    routing as the target (progressive pruning's targets are the original model's outputs)."""
    model = build(family, dtype=dtype)
    adapter, block = next(iter(find_moe_blocks(model).values()))
    n, k = adapter.num_experts(block), adapter.top_k(block)
    r = adapter.valid_r(block)[0]
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    for target in (None, block(x)[0] if isinstance(block(x), tuple) else block(x)):
        search = BeamSearch(adapter, block, r, beam_width=2, swap_rounds=1)
        with torch.no_grad():
            search.add_batch(x, target)
        (batch,) = search.batches
        weights = batch.stats.orig_weight.dtype if target is None else torch.float32
        assert batch.nbytes == 80 * stats_bytes_per_token(n, batch.stats.n_slots, k, dtype, batch.logits.dtype,
                                                          original_routing=target is None, weights_dtype=weights)


def test_deepseek_v3_statistics_fit_one_gpu():
    """DeepSeek-V3's layer (256 experts in 8 groups, top-8) at r = 128: the rank bound gives each token 8 x (16 + 8)
    = 192 slots (random scores: no ties), so the statistics of 128 x 2048 tokens take 20.2 GB (the float32 router
    logits included), where float64 Gram matrices and int64 slots took 78.5 GB."""
    scores = torch.rand(512, 256, generator=torch.Generator().manual_seed(0))
    groups = [list(range(g * 32, (g + 1) * 32)) for g in range(8)]
    slots = rank_bound_mask(scores, 128, 8, groups).sum(1)
    assert bool((slots == 192).all())
    per_token = stats_bytes_per_token(256, 192, 8, torch.bfloat16, torch.float32)
    assert per_token == 192 * 193 // 2 * 4 + 8 * 192 + 8 + 2 * 256 + 4 * 256 + 8 * 6 == 77240
    assert round(per_token * 128 * 2048 / 1e9, 1) == 20.2
    # Qwen3-235B-A22B (128 experts, top-8, bf16 router logits and weights) at r = 64: 72 slots
    assert stats_bytes_per_token(128, 72, 8, torch.bfloat16, torch.bfloat16, weights_dtype=torch.bfloat16) == 11640


# ---- the layer forward reuses the scorer's expert outputs ------------------------------------------------------

def _experts_calls(experts, k: int, record: list):
    """Forward hook recording (input routing, output) of the experts module's calls with a k-wide routing (the
    block's call; the scorer's own calls route each token to one expert)."""
    def hook(_mod, args, kwargs, out):
        if args[1].shape[-1] == k:
            record.append((args[0], args[1], args[2], out))
    return experts.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("search_cls", [ExhaustiveScorer, BeamSearch])
def test_scored_forward_passes_on_the_library_output(family, dtype, search_cls):
    """Within a scored forward the block's experts module returns sum_k w_k y_k of the router's own routing from the
    scorer's expert outputs; the library's kernel computes the same sum in the model dtype. Reference: the library's
    experts module on the same input and routing. Bound, elementwise: the library rounds each of the k products
    and each of the k additions (unit roundoff u: 2^-8 bfloat16, 2^-24 float32), ours rounds the float64 sum
    once: (2k + 1) u sum_k |w_k y_k|. The scorer computes the expert outputs y in batches of another composition
    (other GEMM shapes, so another accumulation order inside the experts' matmuls), which moves them by a few ulps
    of their scale: + 4 u max |sum_k |w_k y_k|| over the batch (measured: at most 0.96 u of it, glm4_moe float32;
    0 elsewhere)."""
    model = build(family, dtype=dtype)
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
    for adapter, block in find_moe_blocks(model).values():
        moe = adapter.bind(block)
        k, r = moe.top_k(), moe.valid_r()[0]
        x = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
        library, ours = [], []
        handle = _experts_calls(moe.experts(), k, library)
        with torch.no_grad():
            expected = block(x)
        handle.remove()
        scorer = search_cls(adapter, block, r) if search_cls is ExhaustiveScorer else search_cls(adapter, block, r, 2, 1)
        handle = _experts_calls(moe.experts(), k, ours)
        with torch.no_grad(), scored_forward(moe, scorer) as state:
            got = block(x)
        handle.remove()
        assert state["reused"]
        (h, idx, w, lib_out), (h2, idx2, w2, our_out) = library[0], ours[0]
        assert torch.equal(h, h2) and torch.equal(idx, idx2) and torch.equal(w, w2)
        ones = torch.ones(h.shape[0], 1)
        with torch.no_grad():
            terms = torch.stack([w[:, j:j + 1].double() * moe.experts()(h, idx[:, j:j + 1], ones).double()
                                 for j in range(k)])  # (k, T, H)
        scale = terms.abs().sum(0)
        bound = (2 * k + 1) * u * scale + 4 * u * scale.max()
        diff = (our_out.double() - lib_out.double()).abs()
        assert bool((diff <= bound).all()), float((diff - bound).max())
        got = got[0] if isinstance(got, tuple) else got
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert got.shape == expected.shape and got.dtype == expected.dtype


@pytest.mark.parametrize("method", ["layerwise_pruning", "progressive_pruning"])
def test_the_routed_experts_run_only_in_the_scorer(method, monkeypatch):
    """During a pruning walk the library's experts module never runs a block's k-wide routing (one call per batch
    and layer before): the layer forwards take the routed output from the scorer (layer-wise, and progressive until
    its first pruned layer), or need no output at all (progressive's forward of the pruned model's states). What
    still runs it: progressive's forwards of the original model's states after its first pruned layer (the targets)
    and of the pruned layers (the next layer's inputs)."""
    model = build("mixtral", num_hidden_layers=3)
    experts_cls = type(find_moe_blocks(model)[0][1].experts)
    calls = []
    original = experts_cls.forward
    monkeypatch.setattr(experts_cls, "forward", lambda self, h, idx, w: calls.append(idx.shape[-1]) or original(self, h, idx, w))
    calib = loader(n_blocks=4, seq=16, batch=2)  # 2 batches
    cfg = run_cfg(method, 6)
    METHODS[method](model, calib, cfg)
    block_calls = calls.count(2)
    # progressive: layers 1 and 2 run the original states through the library (2 x 2 batches); the pruned layers
    # 0 and 1 compute the next layer's pruned states (2 x 2 batches)
    assert block_calls == (0 if method == "layerwise_pruning" else 8)
    assert calls.count(1) > 0  # the scorer's calls


# ---- profile ---------------------------------------------------------------------------------------------------

def test_profile_phases_are_exclusive(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(Profile, "_now", lambda self: float(next(clock)))
    p = Profile(phases=True)
    with p.layer(3):                      # t=0
        with p.phase("forward"):          # t=1
            with p.phase("expert_outputs"):   # t=2
                pass                      # t=3
            with p.phase("search"):       # t=4
                pass                      # t=5
        with p.phase("save"):             # t=6 (forward's end), t=7
            pass                          # t=8
    # t=9: layer end
    entry = p.report()["layers"]["3"]
    assert entry["total_s"] == 9
    assert entry["phases_s"] == {"load": 0, "transfer": 0, "forward": 3, "expert_outputs": 1, "statistics": 0,
                                 "search": 1, "save": 1, "other": 3}
    q = Profile(phases=False)
    with q.layer(0), q.phase("forward"):
        pass
    assert set(q.report()["layers"]["0"]) == {"total_s"}


@pytest.mark.parametrize("profile", [True, False])
def test_main_records_the_timing(tiny_mixtral, c4_path, tmp_path, profile):
    out = tmp_path / "out"
    extra = ["--profile"] if profile else []
    assert main.main(["--method", "layerwise_pruning", "--r", "6", *common(tiny_mixtral, c4_path, out), *extra]) == 0
    (result,) = out.iterdir()
    timing = json.loads((result / "pruning_info.json").read_text())["timing"]
    assert timing["profiled"] is profile and timing["capture_s"] > 0 and set(timing["layers"]) == {"0", "1"}
    for entry in timing["layers"].values():
        assert entry["total_s"] > 0
        if profile:
            phases = entry["phases_s"]
            assert all(v >= 0 for v in phases.values())
            assert sum(phases.values()) == pytest.approx(entry["total_s"], rel=1e-9)
            assert phases["forward"] > 0 and phases["expert_outputs"] > 0 and phases["statistics"] > 0
            assert phases["search"] > 0 and phases["load"] > 0
        else:
            assert "phases_s" not in entry


def test_budget_flags_are_checked(tiny_mixtral, c4_path, tmp_path, capsys):
    for flag in ("--states_budget_gib", "--stats_budget_gib"):
        args = ["--method", "layerwise_pruning", "--r", "6", *common(tiny_mixtral, c4_path, tmp_path / "o"), flag, "-1"]
        assert main.main(args) == 2
        assert f"{flag} must be a number of GiB >= 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_benchmark_search_runs_the_deepseek_v3_preset_shrunk(tmp_path):
    """scripts/benchmark_search.py on the deepseek-v3 preset (its dense first layers made MoE layers), shrunk to a
    CPU size: a beam search with every batch's statistics in host memory, its memory and phases in the JSON."""
    from conftest import load_script

    bench = load_script("benchmark_search")
    shrink = ["hidden_size=64", "intermediate_size=64", "moe_intermediate_size=32", "num_attention_heads=4",
              "num_key_value_heads=4", "q_lora_rank=32", "kv_lora_rank=16", "qk_nope_head_dim=8", "qk_rope_head_dim=8",
              "head_dim=8", "v_head_dim=8", "vocab_size=512", "n_routed_experts=32"]
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "deepseek-v3", "--layers", "1", *[a for s in shrink for a in ("--set", s)],
                       "--n_blocks", "4", "--block_size", "32", "--batch_size", "2", "--r", "24", "--device", "cpu",
                       "--profile", "--stats_budget_gib", "0", "--output", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    layer = run["layers"]["0"]
    assert layer["search"] == "beam" and len(layer["dropped_experts"]) == 8
    assert layer["statistics_memory"]["batches_on_host"] == layer["statistics_memory"]["batches"] == 2
    assert run["timing"]["layers"]["0"]["phases_s"]["search"] > 0
