"""Tiny configs of every supported MoE family (built from the real transformers config classes)."""

from __future__ import annotations

import transformers

COMMON = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def family_config(family: str, n_experts: int = 8, top_k: int = 2, **kw):
    c = dict(COMMON)
    if family == "mixtral":
        c.update(intermediate_size=48, num_local_experts=n_experts, num_experts_per_tok=top_k)
        cls = transformers.MixtralConfig
    elif family == "qwen2_moe":
        c.update(intermediate_size=56, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                 num_experts=n_experts, num_experts_per_tok=top_k, norm_topk_prob=False)
        cls = transformers.Qwen2MoeConfig
    elif family == "qwen3_moe":
        c.update(intermediate_size=56, moe_intermediate_size=24, num_experts=n_experts, num_experts_per_tok=top_k,
                 norm_topk_prob=True, head_dim=8)
        cls = transformers.Qwen3MoeConfig
    elif family == "olmoe":
        c.update(intermediate_size=24, num_experts=n_experts, num_experts_per_tok=top_k)
        cls = transformers.OlmoeConfig
    elif family == "deepseek_v2":
        c.update(intermediate_size=56, moe_intermediate_size=24, n_routed_experts=n_experts,
                 num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=0,
                 topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5,
                 kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 head_dim=8, num_key_value_heads=4)
        cls = transformers.DeepseekV2Config
    elif family == "deepseek_v3":
        c.update(num_hidden_layers=3, intermediate_size=56, moe_intermediate_size=24, n_routed_experts=n_experts,
                 num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                 topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=24,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8, num_key_value_heads=4)
        cls = transformers.DeepseekV3Config
    elif family == "glm4_moe":
        c.update(intermediate_size=56, moe_intermediate_size=24, n_routed_experts=n_experts,
                 num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
                 routed_scaling_factor=1.0, norm_topk_prob=True, head_dim=8)
        cls = transformers.Glm4MoeConfig
    elif family == "phimoe":
        c.update(intermediate_size=48, num_local_experts=n_experts, num_experts_per_tok=top_k)
        cls = transformers.PhimoeConfig
    elif family == "gpt_oss":
        c.update(intermediate_size=24, num_local_experts=n_experts, num_experts_per_tok=top_k, head_dim=8,
                 sliding_window=16)
        cls = transformers.GptOssConfig
    else:
        raise KeyError(family)
    c.update(kw)
    return cls(**c)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "phimoe",
            "gpt_oss"]
