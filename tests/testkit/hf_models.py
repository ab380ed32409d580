"""Tiny HF-format checkpoints built from transformers models we did not write (test oracles)."""
from __future__ import annotations

import json
import os

import numpy as np


def randomize(model, seed: int = 0, scale: float = 0.08) -> None:
    """Replace HF's tiny init with weights large enough that errors would show in the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def save_hf_dir(directory: str, config: dict, tensors: dict[str, np.ndarray]) -> str:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))
    return directory


def llama_tiny(num_kv_heads: int, seed: int = 0, vocab: int = 256, hidden: int = 64, heads: int = 4, ffn: int = 96,
               layers: int = 2, max_pos: int = 64, eps: float = 1e-5, theta: float = 10000.0, bias: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=num_kv_heads, rms_norm_eps=eps,
                      max_position_embeddings=max_pos, rope_theta=theta, attention_bias=bias, mlp_bias=bias,
                      tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, seed)
    return model


def telechat_from_llama(llama, training_seqlen: int) -> tuple[dict, dict[str, np.ndarray]]:
    """TeleChat2 HF config + tensors equal to a Llama with zero q/k/v/gate/up biases.

    key_value interleaves K and V per kv head: (Nkv, 2, D, H).
    """
    import torch

    c = llama.config
    hd = c.hidden_size // c.num_attention_heads
    with torch.no_grad():
        for layer in llama.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.bias.zero_()
    sd = {k: v.detach().numpy().copy() for k, v in llama.state_dict().items()}
    out = {"transformer.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, t = f"model.layers.{i}.", f"transformer.h.{i}."
        k = sd[p + "self_attn.k_proj.weight"].reshape(c.num_key_value_heads, hd, c.hidden_size)
        v = sd[p + "self_attn.v_proj.weight"].reshape(c.num_key_value_heads, hd, c.hidden_size)
        out.update({
            t + "input_layernorm.weight": sd[p + "input_layernorm.weight"],
            t + "self_attention.query.weight": sd[p + "self_attn.q_proj.weight"],
            t + "self_attention.key_value.weight": np.stack([k, v], axis=1).reshape(-1, c.hidden_size),
            t + "self_attention.dense.weight": sd[p + "self_attn.o_proj.weight"],
            t + "self_attention.dense.bias": sd[p + "self_attn.o_proj.bias"],
            t + "post_attention_layernorm.weight": sd[p + "post_attention_layernorm.weight"],
            t + "mlp.gate_proj.weight": sd[p + "mlp.gate_proj.weight"],
            t + "mlp.up_proj.weight": sd[p + "mlp.up_proj.weight"],
            t + "mlp.down_proj.weight": sd[p + "mlp.down_proj.weight"],
            t + "mlp.down_proj.bias": sd[p + "mlp.down_proj.bias"],
        })
    hf_config = {"model_type": "telechat", "architectures": ["TelechatForCausalLM"], "vocab_size": c.vocab_size,
                 "hidden_size": c.hidden_size, "n_head": c.num_attention_heads, "n_layer": c.num_hidden_layers,
                 "ffn_hidden_size": c.intermediate_size, "layer_norm_epsilon": c.rms_norm_eps,
                 "training_seqlen": training_seqlen, "base_seqlen": training_seqlen, "seq_length": training_seqlen,
                 "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if c.num_key_value_heads != c.num_attention_heads:
        hf_config["num_key_value_heads"] = c.num_key_value_heads
    return hf_config, out


def hf_moe(kind: str, tmp_path, **overrides):
    """A tiny random transformers MoE model saved as an HF directory (4.x tensor names)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-6,
                  max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager")
    common.update({key: overrides.pop(key) for key in list(overrides) if key in common})
    if kind == "mixtral":
        cfg = MixtralConfig(**common, num_key_value_heads=2, intermediate_size=48, num_local_experts=4,
                            num_experts_per_tok=2, router_aux_loss_coef=0.02, **overrides)
        model = MixtralForCausalLM(cfg)
    else:
        cfg = Qwen2MoeConfig(**common, num_key_value_heads=4, moe_intermediate_size=24, intermediate_size=96,
                             shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
                             decoder_sparse_step=1, **overrides)
        model = Qwen2MoeForCausalLM(cfg)
    model.eval()
    randomize(model, seed=2, scale=0.15)
    model.save_pretrained(str(tmp_path))
    return model, str(tmp_path)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
