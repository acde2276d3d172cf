"""scripts/bench_decode.py's CPU-side helpers (the script itself needs a GPU and runs through `device`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM

from conftest import load_script, tiny_mixtral_config

calibrate_betas = load_script("bench_decode").calibrate_betas


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calibrate_betas_is_the_median_ratio(dtype):
    """Betas = per layer, the median over tokens of w2/w1 of the softmax top-2 routing, computed here by hand
    from each layer's MoE input (captured with a hook) and the router weight."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(vocab_size=64)).to(dtype).eval()
    batch = torch.randint(64, (3, 11))
    inputs, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.register_forward_hook(
            lambda m, a, o, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    betas = calibrate_betas(model, batch)
    assert set(betas) == {"0", "1"}
    for i, layer in enumerate(model.model.layers):
        probs = torch.softmax(F.linear(inputs[i], layer.mlp.gate.weight).float(), dim=-1)
        w = probs.topk(2, dim=-1).values
        ref = (w[:, 1] / w[:, 0]).median().item()
        # the router's own softmax of the same bf16 logits: equal up to float32 rounding of the ratio
        assert betas[str(i)] == pytest.approx(ref, rel=1e-5)
        assert 0 < betas[str(i)] <= 1
