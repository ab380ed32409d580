"""Qwen1.5-MoE-A2.7B (HF ``qwen2_moe``): q/k/v biases, a sigmoid-gated shared expert."""
import os

from mindport.config import ConfigError
from mindport.models.registry import Family
from mindport.research._llama_names import LLAMA_ATTENTION_NAMES, LLAMA_HF_FIELDS

NAMES = LLAMA_ATTENTION_NAMES + [
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers.{i}.mlp.experts.gate_proj"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers.{i}.mlp.experts.up_proj"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "layers.{i}.mlp.experts.down_proj"),
    ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", "layers.{i}.mlp.shared.gate_proj.weight"),
    ("model.layers.{i}.mlp.shared_expert.up_proj.weight", "layers.{i}.mlp.shared.up_proj.weight"),
    ("model.layers.{i}.mlp.shared_expert.down_proj.weight", "layers.{i}.mlp.shared.down_proj.weight"),
    ("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.mlp.shared_gate.weight"),
]

HF_FIELDS = {**LLAMA_HF_FIELDS, "moe_intermediate_size": "moe_intermediate_size", "num_experts": "num_experts",
             "num_experts_per_tok": "moe_top_k", "norm_topk_prob": "norm_topk_prob",
             "shared_expert_intermediate_size": "shared_expert_intermediate_size"}


def _from_hf(hf: dict, values: dict) -> None:
    """Every layer must be sparse: mindport does not build Qwen's dense-MLP layers."""
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        key = "mlp_only_layers" if hf.get("mlp_only_layers") else "decoder_sparse_step"
        raise ConfigError(f"key '{key}' = {hf[key]!r}: expected every layer sparse "
                          "(decoder_sparse_step 1, mlp_only_layers [])")
    values.setdefault("norm_topk_prob", False)


def _to_hf(config, hf: dict) -> None:
    hf.update(decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=config.moe_intermediate_size, qkv_bias=True)


PRESETS = {
    "qwen1.5-moe-a2.7b": dict(num_layers=24, hidden_size=2048, num_heads=16, vocab_size=151936, rope_theta=1e6,
                              rms_norm_eps=1e-6, num_experts=60, moe_intermediate_size=1408, moe_top_k=4,
                              norm_topk_prob=False, shared_expert_intermediate_size=5632,
                              max_position_embeddings=8192, router_aux_loss_coef=0.001,
                              bos_token_id=151643, eos_token_id=151643),
    "qwen-moe-tiny": dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=256, rope_theta=1e6, rms_norm_eps=1e-6,
                          num_experts=6, moe_intermediate_size=24, moe_top_k=2, norm_topk_prob=False,
                          shared_expert_intermediate_size=48, max_position_embeddings=64, router_aux_loss_coef=0.001),
}

CHAT_TEMPLATE = os.path.join(os.path.dirname(__file__), "chat_template.jinja")  # ChatML; sources inside

FAMILY = Family(
    name="qwen_moe", model_types=("qwen2_moe",),
    arch=dict(qkv_bias=True, shared_expert_gate=True, norm_topk_eps=0.0, rope_theta=10000.0),
    hf_fields=HF_FIELDS, hf_export={"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
                                    "tie_word_embeddings": False, "hidden_act": "silu"},
    presets=PRESETS, names=NAMES, from_hf_hook=_from_hf, to_hf_hook=_to_hf,
    fused_experts="model.layers.{i}.mlp.experts", chat_template_file=CHAT_TEMPLATE)
