"""Mixtral-8x7B and Chinese-Mixtral-8x7B (HF ``mixtral``; transformers 4.x tensor names)."""
import os

from mindport.models.registry import Family
from mindport.research._llama_names import LLAMA_ATTENTION_NAMES, LLAMA_HF_FIELDS

NAMES = LLAMA_ATTENTION_NAMES + [
    ("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.mlp.router.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "layers.{i}.mlp.experts.gate_proj"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "layers.{i}.mlp.experts.up_proj"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "layers.{i}.mlp.experts.down_proj"),
]

HF_FIELDS = {**LLAMA_HF_FIELDS, "intermediate_size": "moe_intermediate_size", "num_local_experts": "num_experts",
             "num_experts_per_tok": "moe_top_k"}

_8X7B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, moe_intermediate_size=14336,
             num_experts=8, moe_top_k=2, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
             router_aux_loss_coef=0.02)
PRESETS = {
    "mixtral-8x7b": _8X7B,
    "chinese-mixtral-8x7b": dict(_8X7B, vocab_size=57000),  # vocabulary extended for Chinese
    "mixtral-tiny": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, moe_intermediate_size=48,
                         num_experts=4, moe_top_k=2, vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-5,
                         router_aux_loss_coef=0.02),
}

FAMILY = Family(
    name="mixtral", model_types=("mixtral",),
    arch=dict(rope_theta=1e6, norm_topk_prob=True, norm_topk_eps=0.0, bos_token_id=1, eos_token_id=2),
    hf_fields=HF_FIELDS, hf_export={"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                                    "tie_word_embeddings": False, "hidden_act": "silu"},
    presets=PRESETS, names=NAMES, fused_experts="model.layers.{i}.mlp.experts",
    chat_template_file=os.path.join(os.path.dirname(__file__), "chat_template.jinja"))
