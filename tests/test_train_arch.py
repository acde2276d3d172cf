"""scripts/train_moe.py's --arch (qwen3_moe, dense), --preset and --aux_loss, against hand computations."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from conftest import load_script

train_moe = load_script("train_moe")

SENTENCES = ["The history of the town begins in 1820, when a mill was built on the river.",
             "In mathematics, a prime number is a natural number greater than 1.",
             "The railway reached the valley in 1871 and the population doubled within ten years."]
# The tiny model of the training runs below: hidden H, L layers, 4 heads of 8 (2 KV heads), E experts
# of FFN width F, top-k routing; vocabulary V.
H, L, E, K, F_EXP, V = 32, 2, 8, 2, 16, 300
MODEL_FLAGS = ["--hidden_size", str(H), "--num_layers", str(L), "--num_heads", "4", "--num_kv_heads", "2",
               "--num_experts", str(E), "--top_k", str(K), "--intermediate_size", str(F_EXP), "--seq_len", "32"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A pre-tokenized folder (prepare step) from small JSON-lines files written here: no shared data needed."""
    d = tmp_path_factory.mktemp("data")
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    (d / "wiki.jsonl").write_text(lines({"text": " ".join(SENTENCES[i % 3:] + SENTENCES[:i % 3]) * 3}
                                        for i in range(60)))
    (d / "held.jsonl").write_text(lines({"text": " ".join(SENTENCES) * 4} for _ in range(10)))
    qa = [{"question": f"Tom has {i} apples and buys {i + 2}. How many?", "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"}
          for i in range(40)]
    (d / "gsm_train.jsonl").write_text(lines(qa[:30]))
    (d / "gsm_test.jsonl").write_text(lines(qa[30:]))
    out = d / "tok"
    train_moe.main(["--prepare_only", "--tokenized_dir", str(out), "--vocab_size", str(V), "--seq_len", "32",
                    "--wiki_train", str(d / "wiki.jsonl"), "--wiki_heldout", str(d / "held.jsonl"),
                    "--gsm8k_train", str(d / "gsm_train.jsonl"), "--gsm8k_test", str(d / "gsm_test.jsonl")])
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == V
    return out


def train(tokenized, out, *flags):
    train_moe.main(["--tokenized_dir", str(tokenized), *MODEL_FLAGS, "--max_steps", "2", "--batch_size", "2",
                    "--device", "cpu", "--eval_every", "0", "--sample_tokens", "2", "--max_eval_blocks", "2",
                    "--out", str(out), *flags])
    return json.loads((out / "train_summary.json").read_text())


def hand_counts(qk_norm: bool, ffn_per_layer: int, router: bool) -> int:
    """Parameters of the tiny model by hand: tied embedding, per layer q/k/v/o projections (+ Qwen3's q/k RMSNorm
    over the head dim), two RMSNorms, the FFN parameters given, a router of E x H; the final RMSNorm."""
    attn = H * 4 * 8 + 2 * H * 2 * 8 + 4 * 8 * H + (2 * 8 if qk_norm else 0)
    return V * H + L * (attn + 2 * H + ffn_per_layer + (E * H if router else 0)) + H


def test_qwen3_moe_and_dense_twin_train_and_load(tokenized, tmp_path):
    moe_dir, dense_dir = tmp_path / "moe", tmp_path / "dense"
    moe = train(tokenized, moe_dir, "--arch", "qwen3_moe", "--aux_loss", "per_layer")
    dense = train(tokenized, dense_dir, "--arch", "dense", "--dense_family", "qwen3", "--max_steps", "3",
                  "--time_limit_s", "1e-9")

    m = AutoModelForCausalLM.from_pretrained(moe_dir)  # plain transformers
    assert type(m).__name__ == "Qwen3MoeForCausalLM" and m.config.norm_topk_prob
    assert (m.config.num_experts, m.config.num_experts_per_tok, m.config.moe_intermediate_size) == (E, K, F_EXP)
    saved = json.loads((moe_dir / "config.json").read_text())
    assert saved["num_experts"] == saved["num_local_experts"] == E  # 4.x reads num_experts (default 128)
    assert saved["rope_theta"] == saved["rope_parameters"]["rope_theta"] == 1e6  # 4.x reads rope_theta
    total = hand_counts(True, E * 3 * H * F_EXP, router=True)
    assert moe["params"]["total"] == total == sum(p.numel() for p in m.parameters())
    assert moe["params"]["active_per_token"] == total - L * (E - K) * 3 * H * F_EXP
    assert moe["safetensors_sha256"] == hashlib.sha256((moe_dir / "model.safetensors").read_bytes()).hexdigest()
    assert moe["model_class"] == "Qwen3MoeForCausalLM" and moe["arch"] == "qwen3_moe"
    assert all("aux_loss" in h and len(h["load_min_max"]) == L for h in moe["history"])
    assert len(moe["expert_load_wiki"]) == L and all(abs(sum(r) - 1) < 1e-3 for r in moe["expert_load_wiki"])
    card = (moe_dir / "README.md").read_text()
    assert f"**{total:,}** in total" in card and moe["safetensors_sha256"] in card

    d = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert type(d).__name__ == "Qwen3ForCausalLM" and d.config.intermediate_size == K * F_EXP
    assert dense["params"]["total"] == dense["params"]["active_per_token"] == hand_counts(True, 3 * H * K * F_EXP, False)
    # The twin runs through the same parameters per token as the MoE, less the routers.
    assert dense["params"]["active_per_token"] == moe["params"]["active_per_token"] - L * E * H
    assert dense["steps"] == 1 and dense["planned_steps"] == 3  # --time_limit_s stopped it after one step
    assert "stopped by `--time_limit_s" in (dense_dir / "README.md").read_text()
    assert all("aux_loss" not in h for h in dense["history"]) and dense["expert_load_wiki"] is None


def test_mistral_dense_twin_counts(tokenized, tmp_path):
    dense = train(tokenized, tmp_path / "d", "--arch", "dense")
    assert dense["model_class"] == "MistralForCausalLM"
    assert dense["params"]["active_per_token"] == hand_counts(False, 3 * H * K * F_EXP, False)


def tiny_qwen3_moe(coef: float) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=coef)
    model = AutoModelForCausalLM.from_config(cfg).float()
    for layer in model.model.layers:  # transformers initialises routers at zero: give them some routing
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    return model


def test_qwen3_moe_training_loss_includes_the_aux_loss():
    model = tiny_qwen3_moe(coef=0.3)
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    args = lambda mode: type("A", (), {"aux_loss": mode, "aux_coef": 0.3})  # noqa: E731

    # global: the model's own loss with labels (LM + router_aux_loss_coef x its aux_loss)
    loss, lm, aux, _ = train_moe.training_loss(model, x, args("global"))
    ref = model(input_ids=x, labels=x, output_router_logits=True)
    assert float(loss) == pytest.approx(float(ref.loss), rel=1e-6) and float(aux) == pytest.approx(float(ref.aux_loss))
    logits = model(input_ids=x).logits[:, :-1]
    assert float(lm) == pytest.approx(float(F.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1))), rel=1e-6)

    # per_layer: each layer's router logits (recorded by hooks), its Switch loss by hand, averaged
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: seen.append(o[0].detach()))
             for layer in model.model.layers]
    try:
        loss, lm2, aux, _ = train_moe.training_loss(model, x, args("per_layer"))
    finally:
        for h in hooks:
            h.remove()
    per_layer = []
    for logits_l in seen:
        p = torch.softmax(logits_l.double(), dim=-1)  # (tokens, E)
        chosen = p.topk(2, dim=-1).indices
        f = torch.stack([(chosen == e).sum() for e in range(8)]).double() / p.shape[0]  # assignments per token
        per_layer.append(8 * float((f * p.mean(0)).sum()))
    assert len(per_layer) == 3 and float(aux) == pytest.approx(sum(per_layer) / 3, rel=1e-5)
    assert float(lm2) == pytest.approx(float(lm), rel=1e-6)
    assert float(loss) == pytest.approx(float(lm2) + 0.3 * sum(per_layer) / 3, rel=1e-6)
    # The aux term is in the graph: it moves the routers' gradient.
    grads = []
    for term in (lambda: train_moe.training_loss(model, x, args("per_layer"))[0],
                 lambda: train_moe.training_loss(model, x, args("per_layer"))[1]):
        model.zero_grad()
        term().backward()
        grads.append(model.model.layers[0].mlp.gate.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_autocast_grouped_mm_runs_the_bf16_weights():
    """Under autocast the wrapper gives exactly transformers' grouped_mm on a bfloat16 copy of the experts, and
    its gradients reach the float32 weights; without autocast it is transformers' grouped_mm."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    experts = tiny_qwen3_moe(0.0).model.layers[0].mlp.experts
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    gen = torch.Generator().manual_seed(2)
    h, idx, w = torch.randn(20, 32, generator=gen), torch.randint(0, 8, (20, 2), generator=gen), torch.rand(20, 2, generator=gen)
    bf16 = copy.deepcopy(experts).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_moe.autocast_grouped_mm_forward(experts, h, idx, w)
        ref = grouped_mm_experts_forward(bf16, h, idx, w)
        fp32_under_autocast = grouped_mm_experts_forward(experts, h, idx, w)
    assert torch.equal(out, ref) and not torch.equal(out, fp32_under_autocast)
    out.sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32 and experts.gate_up_proj.grad.abs().sum() > 0
    assert torch.equal(train_moe.autocast_grouped_mm_forward(experts, h, idx, w), grouped_mm_experts_forward(experts, h, idx, w))


def test_presets_sizes_and_overrides():
    """The issue's testbeds (8 experts top-2, 8 layers, 50-100M; 64 experts top-8, 8 layers, ~100M), their dense
    twins of the same active size less the routers, explicit flags over the preset, and the demo defaults unchanged."""
    counts = {}
    for name in train_moe.PRESETS:
        args = train_moe.parse_args(["--preset", name])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(train_moe.build_config(args, 8192, 1, 2))
        counts[name] = train_moe.count_params(model)
        assert model.config.num_hidden_layers == 8
    assert 50e6 <= counts["testbed-8x"]["total"] <= 100e6 and 90e6 <= counts["testbed-64x"]["total"] <= 120e6
    for moe, dense, n in (("testbed-8x", "dense-8x", 8), ("testbed-64x", "dense-64x", 64)):
        assert counts[dense]["active_per_token"] == counts[moe]["active_per_token"] - 8 * n * 512
    a = train_moe.parse_args(["--preset", "testbed-64x", "--max_steps", "7", "--aux_loss", "global"])
    assert (a.arch, a.num_experts, a.top_k, a.max_steps, a.aux_loss) == ("qwen3_moe", 64, 8, 7, "global")
    demo = train_moe.parse_args([])  # demo/tiny-moe's documented command relies on these
    assert (demo.arch, demo.hidden_size, demo.intermediate_size, demo.num_layers, demo.num_experts, demo.top_k,
            demo.batch_size, demo.max_steps, demo.lr, demo.warmup_steps, demo.aux_loss, demo.experts_impl) == \
        ("mixtral", 256, 192, 4, 8, 2, 128, 4000, 3e-3, 150, "global", "grouped_mm")
