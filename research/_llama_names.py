"""HF names of the LLaMA-style attention and norms that XVERSE, Mixtral and Qwen-MoE share."""

LLAMA_ATTENTION_NAMES = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_proj.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj.weight"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k_proj.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj.weight"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v_proj.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
    ("model.layers.{i}.self_attn.rotary_emb.inv_freq", None),  # cached buffer in old checkpoints
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]

# config.json keys every LLaMA-style family spells the same way.
LLAMA_HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings", "rope_theta": "rope_theta",
    "initializer_range": "initializer_range", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id", "router_aux_loss_coef": "router_aux_loss_coef",
}
