"""Dynamic skipping at inference against independent references, on tiny random Mixtral models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

import main
from model import DynamicSkipping, load_model
from model.adapters import UnsupportedRoutingError

from conftest import save_model, tiny_mixtral_config

IMPLS = ["eager", "grouped_mm", "batched_mm"]


def paper_skipping_moe(block, x, beta):
    """The paper's skipping block on transformers 5.x Mixtral weights: softmax, top-2, zero the 2nd
    weight when w2 < beta * w1, renormalise (the skipped expert runs with weight 0 here)."""
    shape = x.shape
    h = x.reshape(-1, shape[-1])
    p = torch.softmax(F.linear(h, block.gate.weight).float(), dim=-1)
    w, i = torch.topk(p, 2, dim=-1)
    mask = w[:, 1] < beta * w[:, 0]
    w[mask, 1] = 0
    w = w / w.sum(dim=-1, keepdim=True)
    return block.experts(h, i, w).reshape(shape), mask


def top1_moe(block, x):
    shape = x.shape
    h = x.reshape(-1, shape[-1])
    p = torch.softmax(F.linear(h, block.gate.weight).float(), dim=-1)
    i = p.argmax(dim=-1, keepdim=True)
    return block.experts(h, i, torch.ones_like(i, dtype=torch.float32)).reshape(shape)


def reference_logits(model, ids, moe):
    """Logits with every MoE block's output replaced by moe(block, x, layer_index)."""
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: moe(m, a[0], i))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture
def model_dir(tmp_path):
    return save_model(tiny_mixtral_config(vocab_size=256, layers=2), tmp_path / "m")


def ids(n=2, t=24, seed=0):
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def fresh(model_dir, impl):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation=impl).eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_beta_zero_is_stock_and_large_beta_is_top1(model_dir, impl):
    stock = fresh(model_dir, impl)
    x = ids()
    with torch.no_grad():
        expected = stock(x).logits
    model = fresh(model_dir, impl)
    with DynamicSkipping(model, {"0": 0.0, "1": 0.0}) as skip, torch.no_grad():
        # Exact on purpose: with no skip the hook returns the router's own tensors and "skip+<impl>" hands
        # them to <impl> unchanged, so this is the same kernel on the same shapes as the stock model.
        assert torch.equal(model(x).logits, expected)
        assert skip.stats()["skip_rate"] == 0.0
    with DynamicSkipping(model, {"0": 1.5, "1": 1.5}) as skip, torch.no_grad():
        got = model(x).logits
        assert skip.stats()["skip_rate"] == 1.0
    # Same routing; the expert GEMMs run on other shapes (top-2 with sentinel slots vs top-1), so the
    # logits agree to float32 rounding, as in test_skipping_equals_paper_block.
    torch.testing.assert_close(got, reference_logits(fresh(model_dir, impl), x, lambda b, h, _: top1_moe(b, h)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_skipping_equals_paper_block(model_dir, impl, beta):
    x = ids()
    masks = []

    def moe(block, h, _layer):
        out, mask = paper_skipping_moe(block, h, beta)
        masks.append(mask)
        return out

    expected = reference_logits(fresh(model_dir, impl), x, moe)
    model = fresh(model_dir, impl)
    with DynamicSkipping(model, {"0": beta, "1": beta}) as skip, torch.no_grad():
        got = model(x).logits
        stats = skip.stats()
    # Same routing decisions exactly; outputs equal up to float32 rounding, because the skipped
    # rows never reach the expert kernel, whose GEMM then runs on fewer rows.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    skipped = [int(m.sum()) for m in masks]
    assert 0 < sum(skipped) < 2 * x.numel()  # some tokens skip, some do not
    assert [stats["layers"][str(i)]["skipped"] for i in range(2)] == skipped
    assert stats["tokens"] == 2 * x.numel()
    assert stats["skip_rate"] == pytest.approx(sum(skipped) / (2 * x.numel()))


def test_uncounted_block_skips_but_leaves_the_counters(model_dir):
    """`uncounted()` (trial batches of lm-eval's batch-size search): the same logits as counted passes, and the
    counters as they were before the block, also for a device first seen inside it."""
    x, y = ids(seed=0), ids(seed=1)
    model = fresh(model_dir, "eager")
    with DynamicSkipping(model, {"0": 0.5, "1": 0.5}) as skip, torch.no_grad():
        with skip.uncounted():  # nothing counted yet: the counters are created inside
            first = model(x).logits
        assert (skip.stats()["tokens"], skip.stats()["skipped"]) == (0, 0)
        torch.testing.assert_close(model(x).logits, first, rtol=0, atol=0)
        before = skip.stats()
        assert before["tokens"] == 2 * x.numel() and before["skipped"] > 0
        with skip.uncounted():
            model(y)
        assert skip.stats() == before


class CountExpertRows(TorchFunctionMode):
    """Counts the token rows fed to expert up-projections (F.linear with a (2I, H) weight)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.rows = shape, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and tuple(args[1].shape) == self.shape:
            self.rows += args[0].shape[0]
        return func(*args, **(kwargs or {}))


def test_skipped_experts_receive_no_tokens(model_dir):
    x = ids()
    model = fresh(model_dir, "eager")
    shape = tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape[1:])
    with CountExpertRows(shape) as stock, torch.no_grad():
        model(x)
    n_tokens = x.numel()
    assert stock.rows == 2 * 2 * n_tokens  # 2 layers x top-2
    with DynamicSkipping(model, {"0": 0.5, "1": 0.5}) as skip, CountExpertRows(shape) as counted, torch.no_grad():
        model(x)
    assert skip.stats()["skipped"] > 0
    assert counted.rows == stock.rows - skip.stats()["skipped"]


def _cli(method, model_dir, out, c4_path, *extra):
    assert main.main(["--method", method, *extra, "--calib_set", "c4", "--calib_path", str(c4_path),
                      "--model_path", str(model_dir), "--output_path", str(out), "--max_block_size", "48",
                      "--n_blocks_for_stat", "8", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
                      "--dtype", "float32"]) == 0
    (result,) = [p for p in out.iterdir() if p.name.startswith(model_dir.name + "_" + method)]
    return result


def paper_logits(model, x, betas):
    return reference_logits(model, x, lambda b, h, i: paper_skipping_moe(b, h, betas[str(i)])[0])


def test_checkpoint_roundtrip_switch_off_and_generate(tiny_mixtral, c4_path, tmp_path):
    ckpt = _cli("dynamic_skipping", tiny_mixtral, tmp_path / "out", c4_path)
    betas = json.loads((ckpt / "config.json").read_text())["betas"]
    model, tok = load_model(str(ckpt), device="cpu", dtype="float32")
    assert model.dynamic_skipping is not None and model.dynamic_skipping.enabled
    x = tok(["The history of the city begins in the middle ages, when a small market grew."],
            return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        skipping_logits = model(x).logits
        stock_logits = plain(x).logits
    torch.testing.assert_close(skipping_logits, paper_logits(plain, x, betas), rtol=1e-5, atol=1e-6)
    assert 0 < model.dynamic_skipping.stats()["skip_rate"] < 1
    assert not torch.equal(skipping_logits, stock_logits)
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=6, do_sample=False)
        assert gen.shape[1] == x.shape[1] + 6
        model.dynamic_skipping.disable()
        # Off: the stock model's kernel on the same shapes and weights, so bit for bit on any machine;
        # on again: the same computation as before.
        assert torch.equal(model(x).logits, stock_logits)
        model.dynamic_skipping.enable()
        assert torch.equal(model(x).logits, skipping_logits)
    # Plain load without skipping.
    off, _ = load_model(str(ckpt), device="cpu", dtype="float32", skipping=False)
    assert off.dynamic_skipping is None
    with torch.no_grad():
        assert torch.equal(off(x).logits, stock_logits)


def test_pruning_and_skipping_compose(tiny_mixtral, c4_path, tmp_path):
    pruned = _cli("layerwise_pruning", tiny_mixtral, tmp_path / "out", c4_path, "--r", "6")
    both = _cli("dynamic_skipping", pruned, tmp_path / "out2", c4_path)
    config = json.loads((both / "config.json").read_text())
    assert config["num_local_experts"] == 6 and set(config["betas"]) == {"0", "1"}
    model, tok = load_model(str(both), device="cpu", dtype="float32")
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    x = tok(["Numbers and letters: 12 apples and 7 pears make 19 fruits."], return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(both, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, paper_logits(plain, x, config["betas"]), rtol=1e-5, atol=1e-6)


def test_model_without_betas(model_dir):
    model = fresh(model_dir, "eager")
    with pytest.raises(ValueError, match="no `betas`"):
        DynamicSkipping(model)
    with pytest.raises(ValueError, match="no entry for MoE layer 1"):
        DynamicSkipping(model, {"0": 0.5})


def test_top_k_skipping_generalises_the_rule(tmp_path):
    """Top-3: skip the j-th ranked expert when w_j < beta_j * w_1 (reference written here), renormalise."""
    path = save_model(tiny_mixtral_config(vocab_size=256, top_k=3), tmp_path / "k3")
    betas = {"0": [0.6, 0.4], "1": [0.5, 0.5]}

    def reference(block, h, b):
        shape = h.shape
        flat = h.reshape(-1, shape[-1])
        p = torch.softmax(F.linear(flat, block.gate.weight).float(), dim=-1)
        w, i = torch.topk(p, 3, dim=-1)  # sorted: rank j is column j
        w = w / w.sum(dim=-1, keepdim=True)
        skip = torch.zeros_like(w, dtype=torch.bool)
        skip[:, 1] = w[:, 1] < b[0] * w[:, 0]
        skip[:, 2] = w[:, 2] < b[1] * w[:, 0]
        w = torch.where(skip, 0.0, w)
        w = w / w.sum(dim=-1, keepdim=True)
        return block.experts(flat, i, w).reshape(shape), int(skip.sum())

    x = ids()
    counts = []
    plain = fresh(path, "eager")
    hooks = [layer.mlp.register_forward_hook(
        lambda m, a, o, b=betas[str(n)]: counts.append(reference(m, a[0], b)[1]) or reference(m, a[0], b)[0])
        for n, layer in enumerate(plain.model.layers)]
    with torch.no_grad():
        expected = plain(x).logits
    for h in hooks:
        h.remove()
    model = fresh(path, "eager")
    with DynamicSkipping(model, betas) as skip, torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert skip.stats()["skipped"] == sum(counts) > 0
    with pytest.raises(ValueError, match="needs 2 thresholds"):
        DynamicSkipping(model, {"0": 0.5, "1": 0.5})


def test_top_1_has_nothing_to_skip(tmp_path):
    path = save_model(tiny_mixtral_config(vocab_size=256, top_k=1), tmp_path / "k1")
    with pytest.raises(UnsupportedRoutingError, match="one expert"):
        DynamicSkipping(fresh(path, "eager"), {"0": 0.5, "1": 0.5})


# ---- every family, against its own library router ------------------------------------------------------

# Whether the family's router rescales its chosen weights to a fixed total (one, times
# routed_scaling_factor) in the tiny configs of tests/families.py: Qwen2-MoE is built with
# norm_topk_prob=False, OLMoE's default is False, DeepSeek-V2 and PhiMoE never renormalise.
RENORMALIZING = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False, "deepseek_v2": False,
                 "deepseek_v3": True, "glm4_moe": True, "phimoe": False, "gpt_oss": True}
# GLM4-MoE's tiny config has routed_scaling_factor 1.0, which would hide a lost factor.
FAMILY_KW = {"glm4_moe": dict(routed_scaling_factor=2.5)}
DTYPE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6),
             # bfloat16 outputs of expert GEMMs of other shapes (top-2 with a skipped slot vs top-1, a skipped
             # slot that runs with weight 0 vs one that does not run): a few ulps of 2^-8.
             torch.bfloat16: dict(rtol=2 ** -6, atol=2 ** -8)}


def _router(block):
    return block.router if hasattr(block, "router") else block.gate


def first_choice(family, block, logits, indices):
    """(T,) slot of each token's first choice, by the score the family's router picks experts with."""
    if family in ("deepseek_v3", "glm4_moe"):  # sigmoid score plus the score-correction bias
        score = logits.float().sigmoid() + _router(block).e_score_correction_bias.float()
    else:  # softmax of the logits, top-k of the logits, or sparsemixer's argmax of the logits
        score = logits.float()
    return score.gather(-1, indices).argmax(dim=-1)


def block_outputs(model, x):
    """{MoE layer: block output on x (1, T, H)}; GPT-OSS's block also returns its router scores."""
    from model.adapters import find_moe_blocks

    out = {}
    with torch.no_grad():
        for idx, (_, block) in find_moe_blocks(model).items():
            y = block(x)
            out[idx] = y[0] if isinstance(y, tuple) else y
    return out


def family_models(family, dtype, top_k):
    from families import family_config
    from test_families import build

    model = build(family, **FAMILY_KW.get(family, {})).to(dtype)
    same = AutoModelForCausalLM.from_config(family_config(family, top_k=top_k, **FAMILY_KW.get(family, {})))
    same.load_state_dict(model.state_dict())
    return model, same.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                    "glm4_moe", "phimoe", "gpt_oss"])
def test_large_beta_is_the_library_top1_routing_of_every_family(family, dtype):
    """Every second expert skipped = the family's own router asked for one expert (num_experts_per_tok=1),
    with its own weight for it: routed_scaling_factor included, renormalised where the router renormalises."""
    from model.adapters import find_moe_blocks

    model, top1 = family_models(family, dtype, top_k=1)
    if family == "phimoe":  # sparsemixer ignores top_k and always returns two experts: its top-1 routing is
        for _, block in find_moe_blocks(top1).values():  # its first choice with its own first multiplier
            _router(block).register_forward_hook(lambda m, a, o: (o[0], o[1][:, :1], o[2][:, :1]))
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    expected = block_outputs(top1, x)
    betas = {str(i): 1e3 for i in find_moe_blocks(model)}  # above every w2 / w1
    with DynamicSkipping(model, betas) as skip:
        got = block_outputs(model, x)
        assert skip.stats()["skip_rate"] == 1.0
    for idx in expected:
        torch.testing.assert_close(got[idx], expected[idx], **DTYPE_TOL[dtype], msg=f"layer {idx}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                    "glm4_moe", "phimoe", "gpt_oss"])
def test_middle_beta_keeps_the_routers_total_of_every_family(family, dtype):
    """Reference written here on the library router's output: the second choice is skipped when
    w2 < beta * w1 (ranks by the family's choice score); a renormalising router gives the remaining expert
    the whole original total (routed_scaling_factor included), the others just lose w2. The skipped
    expert runs with weight 0 in the reference."""
    from model.adapters import find_moe_blocks

    model, plain = family_models(family, dtype, top_k=2)
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(6)).to(dtype)
    betas, skipped = {}, {}
    with torch.no_grad():
        for idx, (_, block) in find_moe_blocks(plain).items():
            logits, w, i = _router(block)(x.view(-1, 32))
            first = first_choice(family, block, logits, i)
            ratio = w.float().gather(-1, 1 - first[:, None])[:, 0] / w.float().gather(-1, first[:, None])[:, 0]
            betas[str(idx)] = float(ratio.median())  # about half of the tokens skip, as the paper's beta

    def hand_rule(block, beta):
        def hook(_m, _a, out):
            logits, w, i = out
            first = first_choice(family, block, logits, i)[:, None]
            skip = w.gather(-1, 1 - first) < beta * w.gather(-1, first)  # (T, 1)
            new = w.masked_fill(torch.zeros_like(w, dtype=torch.bool).scatter(-1, 1 - first, skip), 0.0)
            if RENORMALIZING[family]:
                new = new * (w.sum(-1, keepdim=True) / new.sum(-1, keepdim=True))
            skipped[block] = int(skip.sum())
            return logits, new.to(w.dtype), i
        return hook

    for idx, (_, block) in find_moe_blocks(plain).items():
        _router(block).register_forward_hook(hand_rule(block, betas[str(idx)]))
    expected = block_outputs(plain, x)
    with DynamicSkipping(model, betas) as skip:
        got = block_outputs(model, x)
        stats = skip.stats()
    assert [stats["layers"][str(i)]["skipped"] for i in expected] == list(skipped.values())
    assert all(0 < s < 64 for s in skipped.values())
    for idx in expected:
        torch.testing.assert_close(got[idx], expected[idx], **DTYPE_TOL[dtype], msg=f"layer {idx}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                    "glm4_moe", "phimoe", "gpt_oss"])
def test_calibrated_beta_is_the_median_of_second_over_first_choice(family, dtype):
    """Calibration ranks the experts as the skipping rule does (the router's order of choice): beta is the
    median of w_2 / w_1 over the router outputs of one plain forward (reference computed here)."""
    from method import METHODS
    from model.adapters import find_moe_blocks
    from test_families import loader, run_cfg

    model, _ = family_models(family, dtype, top_k=2)
    calib = loader()
    ratios = {}

    def record(idx, block):
        def hook(_m, _a, out):
            logits, w, i = out
            first = first_choice(family, block, logits, i)[:, None]
            ratios.setdefault(idx, []).append((w.float().gather(-1, 1 - first) / w.float().gather(-1, first))[:, 0])
        return hook

    hooks = [_router(b).register_forward_hook(record(idx, b)) for idx, (_, b) in find_moe_blocks(model).items()]
    with torch.no_grad():
        for batch in calib:
            model(input_ids=batch["input_ids"])
    for h in hooks:
        h.remove()
    model, _ = METHODS["dynamic_skipping"](model, calib, run_cfg("dynamic_skipping", None))
    for idx, r in ratios.items():
        # numpy's median (the method's) of the same float32 numbers: the mean of the two middle values
        assert model.config.betas[str(idx)] == pytest.approx(float(torch.cat(r).double().quantile(0.5)), rel=1e-6)
