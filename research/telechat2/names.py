"""TeleChat2 HF tensor names -> mindport parameter names (layouts are identical)."""

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
