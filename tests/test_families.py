"""Every supported MoE family, on tiny random models built from the real transformers configs (CPU)."""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from data import make_loader
from main import RunConfig
from method import METHODS
from model import DynamicSkipping
from model.adapters import InvalidExpertCountError, find_moe_blocks

from families import FAMILIES, family_config

GROUPED = {"deepseek_v2": 2, "deepseek_v3": 2}  # families whose tiny config routes within 2 expert groups
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def tie_router_rows(model):
    """Every odd expert's router row (and router bias, score-correction bias) becomes a copy of the even
    expert's before it, so the router logits of each pair tie exactly on every token, the hardest case
    for tie-breaking; the experts themselves stay different."""
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            if re.search(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$", name):
                t[1::2] = t[0::2]
    return model


def build(family, seed=0, dtype=torch.float32, ties=False, **kw):
    """A tiny random model of `family` (with `ties`: tie_router_rows)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"\.(gate|router)\.weight$", name):
                p.mul_(25.0)  # peakier routing than the 0.02-std init, so experts differ clearly
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0.0, 0.1)
    return (tie_router_rows(model) if ties else model).to(dtype)


def loader(n_blocks=6, seq=24, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_loader(torch.randint(3, 512, (n_blocks, seq), generator=g), batch)


def run_cfg(method, r, **kw):
    return RunConfig(method=method, calib_set="c4", model_path="x", r=r, device="cpu", dtype="float32", **kw)


def record(model, batches):
    """(MoE input, MoE output) per MoE layer per batch, from one full-model forward."""
    blocks = find_moe_blocks(model)
    rec = {idx: [] for idx in blocks}
    hooks = [b.register_forward_hook(
        lambda m, a, o, i=idx: rec[i].append((a[0].detach(), (o[0] if isinstance(o, tuple) else o).detach())))
        for idx, (_, b) in blocks.items()]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for h in hooks:
        h.remove()
    return rec


def library_pruned_block(block, config, kept):
    """Reference: the library's own block class built for len(kept) experts, loaded (strictly) with the
    original tensors sliced along every dimension of size n_experts that comes first."""
    n = block.experts.num_experts
    cfg = copy.deepcopy(config)
    for key in COUNT_KEYS:
        if hasattr(cfg, key):
            setattr(cfg, key, len(kept))
    new = type(block)(cfg).to(next(block.parameters()).dtype)
    idx = torch.tensor(kept)
    new.load_state_dict({k: v.index_select(0, idx) if v.dim() and v.shape[0] == n else v
                         for k, v in block.state_dict().items()}, strict=True)
    return new.eval()


def candidate_drops(family, n=8, r=6):
    if family not in GROUPED:
        return list(itertools.combinations(range(n), n - r))
    size = n // GROUPED[family]
    per = (n - r) // GROUPED[family]
    groups = [range(g * size, (g + 1) * size) for g in range(GROUPED[family])]
    return [tuple(sorted(itertools.chain(*p))) for p in itertools.product(*(itertools.combinations(g, per)
                                                                            for g in groups))]


def by_expert(w, i):
    """Routing slots sorted by expert index: the order of a top-k is not part of the routing (several
    routers use topk(sorted=False), whose slot order is the kernel's business)."""
    order = i.argsort(dim=-1)
    return w.gather(-1, order), i.gather(-1, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_routing_replica_matches_library_router(family, dtype):
    """The replica is fed the very logits the library router computed, so the comparison is of the routing
    rule alone and has no near-ties to worry about: the chosen experts compare exactly; the weights come
    from the same op sequence on the same values and compare at float32 rounding (rtol 1e-6)."""
    model = build(family).to(dtype)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    for adapter, block in find_moe_blocks(model).values():
        logits, w, i = adapter.router(block)(x)
        w2, i2 = by_expert(*adapter.route(block, logits))
        w, i = by_expert(w, i)
        assert torch.equal(i2, i)
        torch.testing.assert_close(w2, w, rtol=1e-6, atol=1e-7)
        # With experts removed: the library router of the library's own block built for the kept experts.
        for drop in candidate_drops(family)[:6]:
            kept = torch.tensor([e for e in range(8) if e not in drop])
            ref = library_pruned_block(block, model.config, kept.tolist())
            ref_logits, w_ref, i_ref = adapter.router(ref)(x)
            # Removing experts removes their router rows: the kept experts' logits are unchanged, up to the
            # rounding of a GEMM of another shape (F.linear(x, W[kept]) vs F.linear(x, W)[:, kept] differ
            # by an ulp on some CPUs; 32-term dot products of O(1) values: atol 1e-5 in float32, one bf16 ulp
            # of the largest logits in bfloat16).
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -4)
            torch.testing.assert_close(ref_logits, logits[:, kept], **tol)
            same = logits.clone()
            same[:, kept] = ref_logits  # the pruned block's logits, in the unpruned numbering
            w3, i3 = by_expert(*adapter.route(block, same, kept))
            w_ref, i_ref = by_expert(w_ref, kept[i_ref])
            assert torch.equal(i3, i_ref)
            torch.testing.assert_close(w3, w_ref, rtol=1e-6, atol=1e-7)


def loss_tolerance(dtype, z_norm: float) -> dict:
    """Tolerance between the fast search's loss of a drop set and the brute force's (library blocks).

    float32: the objective to 1e-6 relative (both sum float32 outputs in float64) and 1e-6 of the layer's
    output norm for drop sets that change no token's routing (exact loss 0).
    bfloat16: the brute force rounds Z and Z_D to bf16 (2^-9 relative per element, a few roundings), so
    its loss is within about 2^-8 of the exact one on the tokens whose routing changed (where
    |Z_t - Z_D,t| is of the order of |Z_t|): rel 2^-7. Its pruned block also rounds the router logits
    and expert outputs of other GEMM shapes, which can move each element of Z_D by an ulp on tokens whose
    routing did not change: abs 2^-8 of sum_b ||Z_b||_F (one ulp of every element)."""
    if dtype == torch.float32:
        return dict(rel=1e-6, abs=1e-6 * z_norm)
    return dict(rel=2 ** -7, abs=2 ** -8 * z_norm)


def check_decision(chosen, losses: dict, tol: dict, where):
    """The search's drop set is the brute force's best, or one whose brute-force loss is within the brute
    force's own noise of the best (drop sets no token reaches, or a near tie in bf16): checked, not assumed."""
    best_drop = min(losses, key=lambda d: (losses[d], list(losses).index(d)))
    if tuple(chosen) != best_drop:
        margin = losses[tuple(chosen)] - losses[best_drop]
        assert margin <= tol["rel"] * losses[best_drop] + tol["abs"], (where, chosen, best_drop, margin)


@pytest.mark.parametrize("dtype,ties", [(torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_exhaustive_search_equals_brute_force(family, dtype, ties):
    """Against the library's own block built for the kept experts, run on every calibration batch. In
    bfloat16 with `ties`: every pair of experts has the same router row."""
    model = build(family, dtype=dtype, ties=ties)
    calib = loader()
    rec = record(model, calib)
    expected, z_norm = {}, {}
    for idx, (_, block) in find_moe_blocks(model).items():
        losses = {}
        for drop in candidate_drops(family):
            ref = library_pruned_block(block, model.config, [e for e in range(8) if e not in drop])
            total = 0.0
            with torch.no_grad():
                for x, z in rec[idx]:
                    out = ref(x)
                    out = out[0] if isinstance(out, tuple) else out
                    total += torch.linalg.norm((z.double() - out.double()).reshape(-1)).item()
            losses[drop] = total
        expected[idx] = losses
        z_norm[idx] = sum(torch.linalg.norm(z.double().reshape(-1)).item() for _, z in rec[idx])
    _, info = METHODS["layerwise_pruning"](model, calib, run_cfg("layerwise_pruning", 6, search="exhaustive"))
    for idx, losses in expected.items():
        got = info["layers"][str(idx)]
        tol = loss_tolerance(dtype, z_norm[idx])
        assert set(got["loss"]) == {",".join(map(str, d)) for d in losses}
        for d, v in losses.items():
            assert got["loss"][",".join(map(str, d))] == pytest.approx(v, **tol), (idx, d)
        check_decision(got["dropped_experts"], losses, tol, idx)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_keeps_the_rest_and_reloads(family, tmp_path):
    model = build(family)
    original = copy.deepcopy(model).state_dict()
    pruned, info = METHODS["layerwise_pruning"](model, loader(), run_cfg("layerwise_pruning", 6))
    assert set(info["layers"]) == {str(i) for i in find_moe_blocks(pruned)}
    for key, value in pruned.state_dict().items():
        ref = original[key]
        if value.shape != ref.shape:  # a per-expert tensor: the kept experts' slices, untouched
            layer = re.search(r"layers\.(\d+)\.", key).group(1)
            ref = ref.index_select(0, torch.tensor(info["layers"][layer]["kept_experts"]))
        assert torch.equal(value, ref), key  # copied data, no arithmetic: exact
    for adapter, block in find_moe_blocks(pruned).values():
        assert adapter.num_experts(block) == 6 and adapter.router(block).num_experts == 6
    assert [getattr(pruned.config, k) for k in COUNT_KEYS if hasattr(pruned.config, k)] != []
    assert all(getattr(pruned.config, k) == 6 for k in COUNT_KEYS if hasattr(pruned.config, k))

    pruned.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # same weights, same kernels, same shapes: exact on any machine
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_all_experts_and_beta_zero_change_nothing(family):
    model = build(family)
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    model, info = METHODS["layerwise_pruning"](model, loader(), run_cfg("layerwise_pruning", 8))
    assert all(v["dropped_experts"] == [] for v in info["layers"].values())
    k = family_config(family).num_experts_per_tok
    zero = {str(i): (0.0 if k == 2 else [0.0] * (k - 1)) for i in find_moe_blocks(model)}
    # Exact on purpose: keeping every expert copies the same weights, and beta = 0 skips nothing (the hook
    # returns the router's tensors unchanged), so both run the stock kernels on the same shapes.
    with DynamicSkipping(model, zero) as skip, torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
        assert skip.stats()["skipped"] == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_group_constraint_names_valid_values():
    model = build("deepseek_v3")
    with pytest.raises(InvalidExpertCountError, match=r"--r 5 .* 8 experts in 2 routing groups .* valid values: 4, 6, 8"):
        METHODS["layerwise_pruning"](model, loader(), run_cfg("layerwise_pruning", 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_layer_io_equals_full_forward(family):
    """Per-layer MoE inputs/outputs of the layer-by-layer runner equal one full forward's (GPT-OSS mixes
    sliding-window and full-attention layers, DeepSeek-V3 has a dense first layer)."""
    from model.runner import LayerRunner, capture_io

    model = build(family)
    calib = loader()
    expected = record(model, calib)
    blocks = find_moe_blocks(model)
    runner = LayerRunner(model, "cpu", progress=False)
    states = runner.capture(calib)
    for idx, layer in runner.iter_layers(desc="test"):
        new_states = []
        for b, state in enumerate(states):
            if idx not in blocks:
                new_states.append(runner.forward(layer, state))
                continue
            with capture_io(blocks[idx][1]) as io:
                new_states.append(runner.forward(layer, state))
            # The same layer modules on the same batch (same shapes, same kernels): exact.
            assert torch.equal(io["inputs"][0], expected[idx][b][0])
            assert torch.equal(io["outputs"][0], expected[idx][b][1])
        states = new_states
