"""MoE families against transformers (Mixtral, Qwen2-MoE), Llama (dense XVERSE) and the numpy
oracle (XVERSE-MoE, which has no transformers implementation). fp32, CPU."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from mindport import AutoModelForCausalLM
from testkit import numpy_models as ref
from testkit.hf_models import hf_moe, llama_tiny, save_hf_dir, torch_logits


TOL = 1e-4


@pytest.mark.parametrize("kind, overrides", [("mixtral", {}), ("qwen2_moe", {"norm_topk_prob": False}),
                                             ("qwen2_moe", {"norm_topk_prob": True})])
def test_moe_logits_match_transformers(tmp_path, kind, overrides):
    model, directory = hf_moe(kind, tmp_path, **overrides)
    ids = np.random.default_rng(0).integers(0, 256, (2, 12))
    ours = AutoModelForCausalLM.from_pretrained(directory)
    diff = np.abs(ours(ids).asnumpy() - torch_logits(model, ids)).max()
    assert diff <= TOL, f"max abs diff {diff:.2e}"


@pytest.mark.parametrize("kind, experts", [("mixtral", 4), ("qwen2_moe", 6)])
def test_aux_loss_matches_transformers(tmp_path, kind, experts):
    """Both pool the loss over layers with one function (transformers' load_balancing_loss_func, the same
    text in modeling_mixtral and modeling_qwen2_moe), without an attention mask here (no padding)."""
    import importlib

    import torch

    load_balancing_loss_func = importlib.import_module(
        f"transformers.models.{kind}.modeling_{kind}").load_balancing_loss_func
    model, directory = hf_moe(kind, tmp_path, output_router_logits=True)
    ids = np.random.default_rng(1).integers(0, 256, (2, 10))
    with torch.no_grad():
        out = model(torch.from_numpy(ids), labels=torch.from_numpy(ids), output_router_logits=True)
    theirs_aux = float(load_balancing_loss_func(out.router_logits, experts, 2))
    ours = AutoModelForCausalLM.from_pretrained(directory)
    coef = model.config.router_aux_loss_coef
    assert ours.config.router_aux_loss_coef == pytest.approx(coef) and ours.config.router_z_loss_coef == 0
    batch = ours.prepare(ids)
    _, router_loss, load = ours.forward(*batch)
    assert abs(float(router_loss.asnumpy()) / coef - theirs_aux) <= 1e-5
    assert load.shape == (2, experts + 1) and float(load[:, -1].sum().asnumpy()) == 0  # (layers, experts + dropped)
    total = float(ours(ids, labels=ids).asnumpy())  # CE + coef * aux, as HF adds it with router logits on
    assert abs(total - float(out.loss)) <= 1e-4


@pytest.mark.parametrize("kind, experts", [("mixtral", 4), ("qwen2_moe", 6)])
def test_aux_loss_skips_padding_as_transformers_with_an_attention_mask(tmp_path, kind, experts):
    """Right-padded rows: transformers' load_balancing_loss_func with the attention mask (and the loss
    its model returns) against ours from the same attention_mask and from segment ids (padding = 0)."""
    import importlib

    import torch

    load_balancing_loss_func = importlib.import_module(
        f"transformers.models.{kind}.modeling_{kind}").load_balancing_loss_func
    model, directory = hf_moe(kind, tmp_path, output_router_logits=True)
    ids = np.random.default_rng(4).integers(0, 256, (2, 10))
    attention_mask = np.ones((2, 10), np.int64)
    attention_mask[0, 6:] = 0
    attention_mask[1, 9:] = 0
    labels = np.where(attention_mask == 1, ids, -100)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(attention_mask),
                    labels=torch.from_numpy(labels), output_router_logits=True)
    theirs = float(load_balancing_loss_func(out.router_logits, experts, 2, torch.from_numpy(attention_mask)))
    assert abs(theirs - float(out.aux_loss)) <= 1e-7
    assert abs(theirs - float(load_balancing_loss_func(out.router_logits, experts, 2))) > 1e-3  # padding matters
    ours = AutoModelForCausalLM.from_pretrained(directory)
    total = float(ours(ids, labels=labels, attention_mask=attention_mask).asnumpy())  # CE + coef * aux
    assert abs(total - float(out.loss)) <= 5e-6  # counting the padding (old code): 1.7e-5 (qwen), 5.4e-5 off
    coef = ours.config.router_aux_loss_coef
    for inputs in ({"attention_mask": attention_mask}, {"segment_ids": attention_mask}):
        _, router_loss, _ = ours.forward(*ours.prepare(ids, **inputs), token_mask=ours.token_mask(**inputs))
        assert abs(float(router_loss.asnumpy()) / coef - theirs) <= 1e-5, inputs


def test_dense_xverse_matches_llama(tmp_path):
    llama = llama_tiny(num_kv_heads=4, seed=3, bias=False, eps=1e-6)
    tensors = {k: v.detach().numpy() for k, v in llama.state_dict().items()}
    c = llama.config
    hf = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "vocab_size": c.vocab_size,
          "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
          "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
          "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings}
    directory = save_hf_dir(str(tmp_path), hf, tensors)
    ids = np.random.default_rng(5).integers(0, 256, (2, 16))
    diff = np.abs(AutoModelForCausalLM.from_pretrained(directory)(ids).asnumpy() - torch_logits(llama, ids)).max()
    assert diff <= TOL, f"max abs diff {diff:.2e}"


def xverse_moe_dir(tmp_path, norm_topk_prob):
    rng = np.random.default_rng(7)
    hf = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "vocab_size": 256, "hidden_size": 64,
          "intermediate_size": 24, "num_attention_heads": 4, "num_hidden_layers": 2, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 64, "rope_theta": 500000.0, "num_experts": 8, "moe_top_k": 3,
          "num_shared_experts": 2, "router_aux_loss_coef": 0.01}
    if norm_topk_prob is not None:
        hf["norm_topk_prob"] = norm_topk_prob
    shapes = ref.expected_weight_shapes(hf)
    tensors = {n: (1.0 + 0.1 * rng.standard_normal(s) if "norm" in n else 0.15 * rng.standard_normal(s))
               .astype(np.float32) for n, s in shapes.items()}
    for n in tensors:
        if n.endswith("router.weight"):
            tensors[n] *= 4  # decisive routing, so ties cannot flip between fp32 and fp64
    return hf, tensors, save_hf_dir(str(tmp_path), hf, tensors)


@pytest.mark.parametrize("norm_topk_prob", [None, True, False])
def test_xverse_moe_matches_numpy_reference(tmp_path, norm_topk_prob):
    hf, tensors, directory = xverse_moe_dir(tmp_path, norm_topk_prob)
    ids = np.random.default_rng(8).integers(0, 256, (2, 16))
    ours = AutoModelForCausalLM.from_pretrained(directory)
    assert ours.config.norm_topk_prob == (norm_topk_prob is not False) and ours.config.norm_topk_eps == 1e-6
    diff = np.abs(ours(ids).asnumpy() - ref.forward(hf, tensors, ids)).max()
    assert diff <= TOL, f"max abs diff {diff:.2e}"


def test_capacity_drops_and_counts_slots(tmp_path):
    _, _, directory = xverse_moe_dir(tmp_path, None)
    ids = np.random.default_rng(9).integers(0, 256, (2, 16))
    dropless = AutoModelForCausalLM.from_pretrained(directory)
    capped = AutoModelForCausalLM.from_pretrained(directory, capacity_factor=0.5)
    dropped = capped.forward(*capped.prepare(ids))[2][:, -1].sum()
    none_dropped = dropless.forward(*dropless.prepare(ids))[2][:, -1].sum()
    slots = 2 * 16 * 3 * 2  # tokens x top-k x layers
    assert float(none_dropped.asnumpy()) == 0 and slots / 2 <= float(dropped.asnumpy()) < slots
    assert np.abs(capped(ids).asnumpy() - dropless(ids).asnumpy()).max() > 1e-3


def test_router_stats_are_named_and_pooled_into_the_router_loss():
    from mindport.transformer.moe import LocalDispatcher, RouterStats

    model = AutoModelForCausalLM.from_preset("mixtral-tiny")
    moe = model.layers["0"].mlp
    assert type(moe.token_dispatcher) is LocalDispatcher  # chosen once: no expert parallelism
    ids = np.random.default_rng(2).integers(0, 256, (2, 8))
    x = model.embed(model.prepare(ids)[0])
    _, stats = moe(x)
    stats = RouterStats(*stats)
    assert stats.fraction.shape == stats.probability.shape == (4,)
    loss, load = model.router_loss([tuple(stats)]), model.expert_load([tuple(stats)])
    c = model.config
    expected = (c.router_aux_loss_coef * 4 * float((stats.fraction * stats.probability).sum().asnumpy())
                + c.router_z_loss_coef * float(stats.z_loss.asnumpy()))
    assert abs(float(loss.asnumpy()) - expected) <= 1e-6 and int(load[0, -1].asnumpy()) == int(stats.dropped.asnumpy())
