"""TeleChat2 (3B/7B/35B/115B): presets, config.json fields and HF names (facts: shared/MODELS.md)."""
import os

from mindport.models.registry import Family

MODEL_TYPES = ("telechat",)
ARCHITECTURES = ("TelechatForCausalLM", "TeleChatForCausalLM", "TeleChat2ForCausalLM")

# Every TeleChat2 model: fused per-head-interleaved key_value, biases on the attention
# output (dense) and down_proj only, dynamic NTK RoPE with base 10000, fp16-rounded
# RoPE tables as in the published code.
ARCH = dict(kv_layout="interleaved", o_bias=True, down_bias=True, rope_theta=10000.0,
            rope_scaling="telechat_ntk", rope_fp16_tables=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)

# config.json key -> ModelConfig field
HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "n_layer": "num_layers", "n_head": "num_heads",
    "num_key_value_heads": "num_kv_heads", "ffn_hidden_size": "ffn_hidden_size",
    "layer_norm_epsilon": "rms_norm_eps", "training_seqlen": "training_seqlen", "base_seqlen": "base_seqlen",
    "seq_length": "max_position_embeddings", "logn": "use_logn_attn", "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
}
HF_EXPORT = {"model_type": "telechat", "architectures": ["TelechatForCausalLM"], "tie_word_embeddings": False,
             "apply_residual_connection_post_layernorm": False, "embed_layernorm": False}

_FULL = dict(vocab_size=131072, training_seqlen=8192, base_seqlen=8192, max_position_embeddings=8192, rms_norm_eps=1e-5)
PRESETS = {
    "telechat2-3b": dict(_FULL, num_layers=24, hidden_size=3072, num_heads=24, ffn_hidden_size=6144),
    "telechat2-7b": dict(_FULL, num_layers=30, hidden_size=4096, num_heads=32, ffn_hidden_size=12288),
    "telechat2-35b": dict(_FULL, num_layers=64, hidden_size=6144, num_heads=48, ffn_hidden_size=20480),
    "telechat2-115b": dict(_FULL, num_layers=96, hidden_size=8192, num_heads=64, num_kv_heads=8,
                           ffn_hidden_size=40960),
    # Tiny shapes of the same architecture, for tests.
    "telechat2-tiny-gqa": dict(vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                               ffn_hidden_size=96, training_seqlen=32, base_seqlen=32, max_position_embeddings=32,
                               rms_norm_eps=1e-5),
    "telechat2-tiny-mha": dict(vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=96,
                               training_seqlen=32, base_seqlen=32, max_position_embeddings=32, rms_norm_eps=1e-5),
    # The demo's model: ~6M parameters, trains on two CPU cores in minutes.
    "telechat2-demo": dict(vocab_size=2048, num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4,
                           ffn_hidden_size=704, training_seqlen=256, base_seqlen=256, max_position_embeddings=256,
                           rms_norm_eps=1e-5),
}

# HF tensor names -> mindport parameter names (layouts are identical)
NAMES = [
    ("transformer.word_embeddings.weight", "embed.weight"),
    ("transformer.h.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("transformer.h.{i}.self_attention.query.weight", "layers.{i}.attn.q_proj.weight"),
    ("transformer.h.{i}.self_attention.key_value.weight", "layers.{i}.attn.kv_proj.weight"),
    ("transformer.h.{i}.self_attention.dense.weight", "layers.{i}.attn.o_proj.weight"),
    ("transformer.h.{i}.self_attention.dense.bias", "layers.{i}.attn.o_proj.bias"),
    ("transformer.h.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("transformer.h.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.weight"),
    ("transformer.h.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.weight"),
    ("transformer.h.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
    ("transformer.h.{i}.mlp.down_proj.bias", "layers.{i}.mlp.down_proj.bias"),
    ("transformer.ln_f.weight", "final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]

CHAT_TEMPLATE = os.path.join(os.path.dirname(__file__), "chat_template.jinja")  # sources inside
CHAT_TOKENS = ("<_user>", "<_bot>", "<_end>", "<_system>")

FAMILY = Family(name="telechat2", model_types=MODEL_TYPES, arch=ARCH, hf_fields=HF_FIELDS, hf_export=HF_EXPORT,
                presets=PRESETS, names=NAMES, chat_template_file=CHAT_TEMPLATE, chat_tokens=CHAT_TOKENS)
