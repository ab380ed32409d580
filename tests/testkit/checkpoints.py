"""HF checkpoint fixtures for the converter tests: every family, fp32/bf16, single/sharded/.bin.

Mixtral and Qwen2-MoE directories come from transformers' own ``save_pretrained`` (read back
as files, so their tensor names are what transformers writes); TeleChat2 and dense XVERSE
reuse a transformers Llama's weights; XVERSE-MoE (no transformers class) is random tensors
under the names of its published checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from testkit.hf_models import hf_moe, llama_tiny, telechat_from_llama


KINDS = ("telechat", "xverse", "xverse_moe", "mixtral", "qwen2_moe")
MODEL_TYPE = {"telechat": "telechat", "xverse": "xverse", "xverse_moe": "xverse", "mixtral": "mixtral",
              "qwen2_moe": "qwen2_moe"}


def require_family(kind: str) -> None:
    """Skip while mindport's family registry cannot read this model_type."""
    from mindport.config import ConfigError
    from mindport.models.registry import detect

    try:
        detect({"model_type": MODEL_TYPE[kind]}, "probe")
    except ConfigError:
        pytest.skip(f"model_type {MODEL_TYPE[kind]!r}: family not in mindport.models.registry.families() yet")


def _save_safetensors(path: str, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _xverse_moe(directory: str, seed: int) -> None:
    import torch

    h, heads, layers, vocab, e, i = 64, 4, 2, 256, 8, 24
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1, base=0.0):
        return base + scale * torch.randn(*shape, generator=gen)

    t = {"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": rnd(h, base=1.0),
         "lm_head.weight": rnd(vocab, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": rnd(h, base=1.0), p + "mlp.router.weight": rnd(e, h),
                  p + "post_attention_layernorm.weight": rnd(h, base=1.0)})
        for proj in "qkvo":
            t[p + f"self_attn.{proj}_proj.weight"] = rnd(h, h)
        for k in range(e):
            t[p + f"mlp.experts.{k}.gate_proj.weight"] = rnd(i, h)
            t[p + f"mlp.experts.{k}.up_proj.weight"] = rnd(i, h)
            t[p + f"mlp.experts.{k}.down_proj.weight"] = rnd(h, i)
        t[p + "mlp.shared_experts.gate_proj.weight"] = rnd(2 * i, h)
        t[p + "mlp.shared_experts.up_proj.weight"] = rnd(2 * i, h)
        t[p + "mlp.shared_experts.down_proj.weight"] = rnd(h, 2 * i)
    config = {"model_type": "xverse", "architectures": ["XverseMoeForCausalLM"], "vocab_size": vocab,
              "hidden_size": h, "intermediate_size": i, "num_attention_heads": heads, "num_hidden_layers": layers,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "rope_theta": 500000.0, "num_experts": e,
              "moe_top_k": 3, "num_shared_experts": 2, "router_aux_loss_coef": 0.01}
    _write_config(directory, config)
    _save_safetensors(os.path.join(directory, "model.safetensors"), t)


def _write_config(directory: str, config: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _base(kind: str, directory: str, seed: int = 0):
    """An fp32 single-file HF directory of ``kind``; returns the torch model when transformers can run it."""
    import torch

    if kind in ("mixtral", "qwen2_moe"):
        return hf_moe(kind, directory)[0]  # transformers' save_pretrained output
    if kind == "xverse_moe":
        _xverse_moe(directory, seed)
        return None
    if kind == "telechat":
        config, arrays = telechat_from_llama(llama_tiny(num_kv_heads=2, seed=seed), training_seqlen=32)
        model = None
    else:  # dense XVERSE: LLaMA names and layout
        model = llama_tiny(num_kv_heads=4, seed=seed, bias=False, eps=1e-6)
        arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        c = model.config
        config = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "vocab_size": c.vocab_size,
                  "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                  "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
                  "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
                  "rope_theta": 10000.0}
    _write_config(directory, config)
    _save_safetensors(os.path.join(directory, "model.safetensors"),
                      {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return model


def rewrite(base: str, directory: str, dtype: str = "fp32", fmt: str = "single", shards: int = 3) -> str:
    """Copy HF dir ``base`` as ``dtype`` (fp32/bf16) in ``fmt``: single safetensors, sharded + index, or .bin."""
    import torch
    from safetensors.torch import load_file

    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(base, "config.json"), directory)
    tensors = load_file(os.path.join(base, "model.safetensors"))
    if dtype == "bf16":
        tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    if fmt == "single":
        _save_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    elif fmt == "bin":
        torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
    else:
        names = list(tensors)
        groups = [names[k::shards] for k in range(shards)]
        weight_map = {}
        for k, group in enumerate(groups):
            file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            _save_safetensors(os.path.join(directory, file_name), {n: tensors[n] for n in group})
            weight_map.update({n: file_name for n in group})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return directory


class HFDirs:
    """Session cache of HF fixture directories, keyed by (kind, dtype, format)."""

    def __init__(self, root: str):
        self.root = root
        self.models: dict = {}
        self._dirs: dict = {}

    def get(self, kind: str, dtype: str = "fp32", fmt: str = "single") -> str:
        require_family(kind)
        key = (kind, dtype, fmt)
        if key not in self._dirs:
            base_key = (kind, "fp32", "single")
            if base_key not in self._dirs:
                path = os.path.join(self.root, "_".join(base_key))
                self.models[kind] = _base(kind, path)
                self._dirs[base_key] = path
            if key != base_key:
                self._dirs[key] = rewrite(self._dirs[base_key], os.path.join(self.root, "_".join(key)), dtype, fmt)
        return self._dirs[key]

    def copy(self, kind: str, destination: str, dtype: str = "fp32", fmt: str = "single") -> str:
        """A private copy to damage."""
        shutil.copytree(self.get(kind, dtype, fmt), destination)
        return destination
