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


def _write_config(directory: str, config: dict, name: str = "config.json") -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
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
    """Copy HF dir ``base`` as ``dtype`` (fp32/bf16) in ``fmt``: single safetensors, sharded + index, .bin
    or old-style (non-zip) .bin."""
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
    elif fmt == "legacy_bin":  # the pickle format before torch 1.6, which torch cannot mmap
        torch.save(tensors, os.path.join(directory, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
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

    def with_model_files(self, kind: str) -> str:
        """The fp32 single-file directory of ``kind`` plus what a published model carries besides weights
        (:func:`add_model_files`)."""
        key = (kind, "fp32", "model_files")
        if key not in self._dirs:
            path = os.path.join(self.root, "_".join(key))
            shutil.copytree(self.get(kind), path)
            add_model_files(path, kind)
            self._dirs[key] = path
        return self._dirs[key]

    def copy(self, kind: str, destination: str, dtype: str = "fp32", fmt: str = "single") -> str:
        """A private copy to damage."""
        shutil.copytree(self.get(kind, dtype, fmt), destination)
        return destination


# Test-only remote code: XVERSE's published checkpoints ship their own modeling code (auto_map);
# here it is transformers' Llama under XVERSE's names, which is what dense XVERSE computes.
XVERSE_CONFIGURATION = """from transformers import LlamaConfig


class XverseConfig(LlamaConfig):
    model_type = "xverse"
"""
XVERSE_MODELING = """from transformers import LlamaForCausalLM

from .configuration_xverse import XverseConfig


class XverseForCausalLM(LlamaForCausalLM):
    config_class = XverseConfig
"""
TELECHAT_CONFIGURATION = """from transformers import PretrainedConfig


class Telechat2Config(PretrainedConfig):
    model_type = "telechat"
"""
REMOTE_CODE = {  # kind -> (auto_map, {file: text}); TeleChat2's modeling file is a stand-in, never imported
    "xverse": ({"AutoConfig": "configuration_xverse.XverseConfig",
                "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"},
               {"configuration_xverse.py": XVERSE_CONFIGURATION, "modeling_xverse.py": XVERSE_MODELING}),
    "telechat": ({"AutoConfig": "configuration_telechat2.Telechat2Config",
                  "AutoModelForCausalLM": "modeling_telechat2.Telechat2ForCausalLM"},
                 {"configuration_telechat2.py": TELECHAT_CONFIGURATION,
                  "modeling_telechat2.py": "# TeleChat2 modeling (stand-in)\n"}),
}


def save_tokenizer(directory: str, vocab_size: int = 200) -> None:
    """A small Metaspace BPE tokenizer (tokenizer.json + tokenizer_config.json) saved by transformers;
    ``vocab_size`` stays below the tiny models' 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mindport.corpus import pydoc_topics

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(pydoc_topics()[:4], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=vocab_size // 2))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def add_model_files(directory: str, kind: str) -> None:
    """What a published HF model directory holds besides weights: a tokenizer, generation_config.json,
    a README in a sub-directory, and for XVERSE and TeleChat2 remote code named by config.json's auto_map
    (with XVERSE's ``hidden_act``)."""
    save_tokenizer(directory)
    generation = {}
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        with open(os.path.join(directory, "generation_config.json")) as f:
            generation = json.load(f)
    generation.update(do_sample=True, top_p=0.85, temperature=0.3, max_new_tokens=7)
    _write_config(directory, generation, "generation_config.json")
    os.makedirs(os.path.join(directory, "docs"), exist_ok=True)
    with open(os.path.join(directory, "docs", "README.md"), "w") as f:
        f.write(f"# tiny {kind}\n")
    family = "xverse" if kind.startswith("xverse") else kind
    if family in REMOTE_CODE:
        auto_map, files = REMOTE_CODE[family]
        for name, text in files.items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        config.update(auto_map=auto_map, hidden_act="silu", transformers_version="4.38.2")
        _write_config(directory, config)
