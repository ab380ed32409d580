"""LoRA against PEFT + transformers: adapter files both ways and the merge, dense (XVERSE = Llama) and
MoE (Mixtral, Qwen2-MoE with its shared expert; routed experts through PEFT's target_parameters)."""
from __future__ import annotations

import os
import re
from functools import partial

import numpy as np
import pytest

from mindport import AutoModelForCausalLM
from mindport.config import ConfigError, LoraConfig
from mindport.models.lora import apply_lora, save_adapter
from testkit.hf_models import hf_moe, llama_tiny, randomize, save_hf_dir, torch_logits

TOL = 1e-4


def xverse_dir(tmp_path):
    llama = llama_tiny(num_kv_heads=2, seed=3, bias=False, eps=1e-6)
    c = llama.config
    hf = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "vocab_size": c.vocab_size,
          "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
          "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
          "num_hidden_layers": c.num_hidden_layers, "rms_norm_eps": c.rms_norm_eps,
          "max_position_embeddings": c.max_position_embeddings}
    tensors = {k: v.detach().numpy() for k, v in llama.state_dict().items()}
    return llama, save_hf_dir(str(tmp_path / "base"), hf, tensors)


def mixtral_base(tmp):
    return hf_moe("mixtral", tmp / "base")


def qwen_moe_base(tmp):
    return hf_moe("qwen_moe", tmp / "base")


CASES = {  # case -> (base builder, PEFT target modules, modules_to_save, target parameters)
    "xverse": (xverse_dir, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               ["lm_head"], []),
    # Chinese-Mixtral's recipe: every attention projection, embedding and head trained whole
    "mixtral": (mixtral_base, ["q_proj", "k_proj", "v_proj", "o_proj"], ["embed_tokens", "lm_head"], []),
    "qwen_moe": (qwen_moe_base, ["q_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.down_proj"],
                 ["embed_tokens"], []),
    # routed experts: both fused parameters (nested in PEFT), or one
    "mixtral_experts": (mixtral_base, ["v_proj"], [], ["experts.gate_up_proj", "experts.down_proj"]),
    "qwen_moe_experts": (qwen_moe_base, [], [], ["experts.down_proj"]),
}
EXPERT_TENSORS = {"experts.gate_up_proj": 2, "experts.down_proj": 1}  # HF 4.x tensors per expert


def peft_adapter(model, targets, saved, params, directory, seed=1):
    """An adapter made by PEFT on the transformers model, with non-zero B (trained-looking)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      modules_to_save=saved, target_parameters=params))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(directory)
    return peft_model.eval()


@pytest.mark.parametrize("family", sorted(CASES))
def test_peft_adapter_loads_into_mindport(tmp_path, family):
    build, targets, saved, params = CASES[family]
    hf_model, base = build(tmp_path)
    peft_model = peft_adapter(hf_model, targets, saved, params, str(tmp_path / "adapter"))
    ids = np.random.default_rng(5).integers(0, 256, (2, 12))
    ours = AutoModelForCausalLM.from_pretrained(base, adapter=str(tmp_path / "adapter"))(ids).asnumpy()
    diff = np.abs(ours - torch_logits(peft_model, ids)).max()
    assert diff <= TOL, f"max abs diff {diff:.2e}"
    assert np.abs(ours - AutoModelForCausalLM.from_pretrained(base)(ids).asnumpy()).max() > 100 * TOL


@pytest.mark.parametrize("family", sorted(CASES))
def test_our_adapter_loads_into_peft(tmp_path, family):
    from peft import PeftModel
    from mindspore import Tensor

    build, targets, saved, params = CASES[family]
    hf_model, base = build(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base)
    apply_lora(model, LoraConfig(lora_rank=4, lora_alpha=8.0, target_modules=targets, modules_to_save=saved,
                                 target_parameters=params))
    rng = np.random.default_rng(0)
    for name, p in model.parameters_and_names():  # B starts at zero: make the adapter matter
        if p.requires_grad:
            p.set_data(Tensor(p.asnumpy() + 0.05 * rng.standard_normal(p.shape).astype(np.float32)))
    save_adapter(model, str(tmp_path / "ours"))
    ids = np.random.default_rng(5).integers(0, 256, (2, 12))
    theirs = PeftModel.from_pretrained(hf_model, str(tmp_path / "ours")).eval()
    diff = np.abs(model(ids).asnumpy() - torch_logits(theirs, ids)).max()
    assert diff <= TOL, f"max abs diff {diff:.2e}"


def test_target_errors(tmp_path):
    model = AutoModelForCausalLM.from_preset("mixtral-tiny")
    with pytest.raises(ConfigError, match=r"'target_modules' = 'qq_proj': matches no module"):
        apply_lora(model, LoraConfig(target_modules=["q_proj", "qq_proj"]))
    with pytest.raises(ConfigError, match=r"'w1': matches only routed experts .* target_parameters"):
        apply_lora(model, LoraConfig(target_modules=["w1"]))
    with pytest.raises(ConfigError, match=r"'target_parameters' = 'experts.w1': matches no routed experts"):
        apply_lora(model, LoraConfig(target_modules=[], target_parameters=["experts.w1"]))
    with pytest.raises(ConfigError, match=r"'experts.down_proj': matches no routed experts' parameter of this "
                                          r"xverse model \(expected none: its routed experts are not fused"):
        apply_lora(AutoModelForCausalLM.from_preset("xverse-moe-tiny"),
                   LoraConfig(target_modules=[], target_parameters=["experts.down_proj"]))
    with pytest.raises(ConfigError, match=r"'lora_dropout' = 0.1: expected 0 with target_parameters"):
        apply_lora(model, LoraConfig(lora_dropout=0.1, target_parameters=["experts.down_proj"]))
    with pytest.raises(ConfigError, match=r"'gate': matches 'model.layers.0.block_sparse_moe.gate', a replicated"):
        apply_lora(model, LoraConfig(target_modules=["gate"]))
    with pytest.raises(ConfigError, match=r"'modules_to_save' = 'head': matches no module"):
        apply_lora(model, LoraConfig(target_modules=".*q_proj", modules_to_save=["head"]))
    with pytest.raises(ConfigError, match=r"'modules_to_save' = 'w2': matches routed experts"):
        apply_lora(model, LoraConfig(target_modules=".*q_proj", modules_to_save=["w2"]))


@pytest.mark.parametrize("family", sorted(CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path, family):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM as HFAuto

    from mindport.cli import main

    build, targets, saved, params = CASES[family]
    hf_model, base = build(tmp_path)
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 64}')
    peft_model = peft_adapter(hf_model, targets, saved, params, str(tmp_path / "adapter"))
    assert main(["lora", "merge", "--base", base, "--adapter", str(tmp_path / "adapter"),
                 "--dst", str(tmp_path / "merged")]) == 0
    theirs = {k: v.detach().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base_tensors = load_file(os.path.join(base, "model.safetensors"))
    assert set(ours) == set(base_tensors)
    changed = 0
    for name, tensor in ours.items():
        ref = theirs.get(name)
        if ref is None:  # transformers 5 fuses experts in memory; the file keeps 4.x names
            ref = fused_expert(theirs, name)
        if ref is None:  # renamed in memory (Mixtral's router): never adapted
            np.testing.assert_array_equal(tensor, base_tensors[name], err_msg=name)
            continue
        assert np.abs(tensor - ref).max() <= 1e-6, name
        changed += not np.array_equal(tensor, base_tensors[name])
    experts = getattr(hf_model.config, "num_local_experts", None) or getattr(hf_model.config, "num_experts", 0)
    assert changed == 2 * (len(targets) + experts * sum(EXPERT_TENSORS[p] for p in params)) + len(saved)  # 2 layers
    assert open(tmp_path / "merged" / "tokenizer_config.json").read() == '{"model_max_length": 64}'
    # XVERSE's own class is remote code: its merged tensors load into the Llama the base came from
    load = HFAuto.from_pretrained if family != "xverse" else partial(type(hf_model).from_pretrained,
                                                                      config=hf_model.config)
    loaded = load(str(tmp_path / "merged")).eval()
    ids = np.random.default_rng(5).integers(0, 256, (2, 12))
    with torch.no_grad():
        assert np.abs(torch_logits(loaded, ids) - torch_logits(peft_model, ids)).max() <= TOL


def fused_expert(state: dict, name: str) -> np.ndarray | None:
    """HF 4.x expert tensor ``name`` cut from transformers 5's fused (E, 2I, H) / (E, H, I) stacks
    (None: not a routed expert's)."""
    m = re.fullmatch(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight", name)
    if m is None:
        return None
    layer, e, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj in ("w2", "down_proj"):
        return state[f"{layer}.mlp.experts.down_proj"][e]
    gate_up = state[f"{layer}.mlp.experts.gate_up_proj"][e]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if proj in ("w1", "gate_proj") else gate_up[half:]


def test_save_pretrained_of_an_adapted_model_fails_in_one_line(tmp_path):
    model = AutoModelForCausalLM.from_preset("mixtral-tiny")
    apply_lora(model, LoraConfig(lora_rank=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"^\S+/out: this model carries a LoRA adapter.*save_adapter.*lora merge"):
        model.save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_dropout_only_in_training():
    from mindspore import Tensor

    model = AutoModelForCausalLM.from_preset("telechat2-tiny-gqa")
    apply_lora(model, LoraConfig(lora_dropout=0.5, target_modules=["query"]))
    for _, p in model.parameters_and_names():
        if p.requires_grad:
            p.set_data(Tensor(p.asnumpy() + 0.5))
    ids = np.arange(8)[None]
    evaluated = model(ids).asnumpy()
    model.set_train(True)
    assert np.abs(model(ids).asnumpy() - evaluated).max() > 1e-2
    model.set_train(False)
    np.testing.assert_array_equal(model(ids).asnumpy(), evaluated)


def test_unsupported_peft_settings_fail_in_one_line(tmp_path):
    import json

    from mindport.models.lora import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True,
                                                              "target_modules": ["q_proj"], "target_parameters": []}))
    with pytest.raises(ConfigError, match=r"adapter_config.json: key 'use_dora' = True: expected False"):
        read_adapter_config(str(tmp_path))
