"""XVERSE: dense (XVERSE-65B and smaller) and MoE (XVERSE-MoE-A4.2B). One model_type, "xverse";
the MoE variant is told apart by ``num_experts`` in config.json, not by ``architectures``."""
import os

from mindport.models.registry import Family
from mindport.research._llama_names import LLAMA_ATTENTION_NAMES, LLAMA_HF_FIELDS

NAMES = LLAMA_ATTENTION_NAMES + [
    # dense MLP
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
    # MoE: router, routed experts (stacked), the shared experts as one SwiGLU
    ("model.layers.{i}.mlp.router.weight", "layers.{i}.mlp.router.weight"),
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers.{i}.mlp.experts.gate_proj"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers.{i}.mlp.experts.up_proj"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "layers.{i}.mlp.experts.down_proj"),
    ("model.layers.{i}.mlp.shared_experts.gate_proj.weight", "layers.{i}.mlp.shared.gate_proj.weight"),
    ("model.layers.{i}.mlp.shared_experts.up_proj.weight", "layers.{i}.mlp.shared.up_proj.weight"),
    ("model.layers.{i}.mlp.shared_experts.down_proj.weight", "layers.{i}.mlp.shared.down_proj.weight"),
]

HF_FIELDS = {**LLAMA_HF_FIELDS, "intermediate_size": "ffn_hidden_size", "num_experts": "num_experts",
             "moe_top_k": "moe_top_k", "norm_topk_prob": "norm_topk_prob"}


def _from_hf(hf: dict, values: dict) -> None:
    """In XVERSE-MoE, intermediate_size is the per-expert width; the shared experts form one
    SwiGLU of num_shared_experts times that width."""
    if hf.get("num_experts"):
        width = values.pop("ffn_hidden_size")
        values["moe_intermediate_size"] = width
        values["shared_expert_intermediate_size"] = int(hf.get("num_shared_experts") or 0) * width


def _to_hf(config, hf: dict) -> None:
    if config.is_moe:
        hf["intermediate_size"] = config.moe_intermediate_size
        hf["num_shared_experts"] = config.shared_expert_intermediate_size // config.moe_intermediate_size
        hf["architectures"] = ["XverseMoeForCausalLM"]
        hf.pop("ffn_hidden_size", None)


_65B = dict(num_layers=80, hidden_size=8192, num_heads=64, ffn_hidden_size=22016, vocab_size=100534,
            max_position_embeddings=16384, rms_norm_eps=1e-6)
_TINY = dict(vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6)
PRESETS = {
    "xverse-65b": _65B,
    "xverse-moe-a4.2b": dict(num_layers=28, hidden_size=2560, num_heads=32, vocab_size=100534, rope_theta=500000.0,
                             max_position_embeddings=8192, rms_norm_eps=1e-6, num_experts=64, moe_top_k=6,
                             moe_intermediate_size=1728, shared_expert_intermediate_size=2 * 1728,
                             router_aux_loss_coef=0.01),
    "xverse-tiny": dict(_TINY, ffn_hidden_size=96),
    "xverse-moe-tiny": dict(_TINY, rope_theta=500000.0, num_experts=8, moe_top_k=3, moe_intermediate_size=24,
                            shared_expert_intermediate_size=48, router_aux_loss_coef=0.01),
}

FAMILY = Family(
    name="xverse", model_types=("xverse",),
    # rope_theta 10000 when config.json has none: not verified against the original code.
    arch=dict(rope_theta=10000.0, norm_topk_prob=True, norm_topk_eps=1e-6, pad_token_id=1, bos_token_id=2,
              eos_token_id=3),
    hf_fields=HF_FIELDS, hf_export={"model_type": "xverse", "architectures": ["XverseForCausalLM"],
                                    "tie_word_embeddings": False},
    presets=PRESETS, names=NAMES, from_hf_hook=_from_hf, to_hf_hook=_to_hf,
    chat_template_file=os.path.join(os.path.dirname(__file__), "chat_template.jinja"))
