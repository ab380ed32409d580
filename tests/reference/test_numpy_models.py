"""Self-checks of the numpy reference against tiny random transformers models (CPU, fp32)."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
from testkit import numpy_models as ref


TOL = 1e-4
V, H, L = 128, 64, 2


# --------------------------------------------------------------------------- fixtures
def _randomize(model, seed: int, std: float = 0.15, router_std: float = 0.6):
    """Replace the tiny default init (std 0.02 -> near-zero logits) by O(1) activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".gate.weight") or "shared_expert_gate" in name:
                p.copy_(router_std * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.double().numpy()


def _saved(model):
    """(config dict, tensors) exactly as save_pretrained writes them (checkpoint names)."""
    import json
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        tensors = {}
        for fn in sorted(os.listdir(d)):
            if fn.endswith(".safetensors"):
                tensors.update(safetensors_numpy.load_file(os.path.join(d, fn)))
    return cfg, tensors


def _ids(seed: int, B: int = 2, S: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(B, S)).astype(np.int64)


def _check(ref_logits, hf_logits, what):
    diff = float(np.max(np.abs(ref_logits - hf_logits)))
    scale = float(np.std(hf_logits))
    print(f"{what}: max|diff| = {diff:.3e} (logit std {scale:.3f})")
    assert scale > 0.1, "test model produces degenerate logits"
    assert diff <= TOL, f"{what}: max abs diff {diff}"
    return diff


def _llama(seed, n_kv=2, **kw):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=L,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _randomize(transformers.LlamaForCausalLM(cfg).eval(), seed)


# --------------------------------------------------------------------------- XVERSE dense
@pytest.mark.parametrize("n_kv", [4, 2])
def test_xverse_dense_matches_llama(n_kv):
    model = _llama(1, n_kv=n_kv)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "hidden_size": H,
           "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": L, "vocab_size": V,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 256}
    if n_kv != 4:
        cfg["num_key_value_heads"] = n_kv
    ids = _ids(1)
    _check(ref.forward(cfg, sd, ids), _hf_logits(model, ids), f"xverse dense n_kv={n_kv} (theta default)")


def test_xverse_dense_rope_theta():
    model = _llama(2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = {"model_type": "xverse", "hidden_size": H, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": L, "vocab_size": V, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0}
    ids = _ids(2, S=20)
    _check(ref.forward(cfg, sd, ids), _hf_logits(model, ids), "xverse dense theta 5e5")
    cfg.pop("rope_theta")
    assert np.max(np.abs(ref.forward(cfg, sd, ids) - _hf_logits(model, ids))) > 1e-3


# --------------------------------------------------------------------------- Mixtral
def _mixtral(seed, E=4, k=2):
    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=L,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                     num_experts_per_tok=k, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _randomize(transformers.MixtralForCausalLM(cfg).eval(), seed)


@pytest.mark.parametrize("E,k", [(4, 2), (8, 2)])
def test_mixtral_matches_hf(E, k):
    model = _mixtral(3 + E, E, k)
    cfg, sd = _saved(model)
    assert f"model.layers.0.block_sparse_moe.experts.{E - 1}.w2.weight" in sd
    assert set(sd) == set(ref.expected_weight_shapes(cfg))
    for name, shape in ref.expected_weight_shapes(cfg).items():
        assert sd[name].shape == shape, name
    ids = _ids(3)
    out, router = ref.forward(cfg, sd, ids, return_router_logits=True)
    _check(out, _hf_logits(model, ids), f"mixtral E={E} k={k}")
    # without renormalisation the result must differ (the test exercises the routing weights)
    assert np.max(np.abs(ref.forward(cfg, sd, ids, norm_topk_prob=False) - out)) > 1e-2

    # aux loss cross-check against transformers' load_balancing_loss_func
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    with torch.no_grad():
        hf = model(torch.from_numpy(ids), output_router_logits=True)
    hf_router = tuple(t.double() for t in hf.router_logits)
    for a, b in zip(router, hf_router):
        assert np.max(np.abs(a - b.numpy())) < 1e-4
    want = float(load_balancing_loss_func(hf_router, E, k))
    got = ref.mixtral_aux_loss([r.numpy() for r in hf_router], k, E)
    print(f"mixtral aux loss: ref {got:.8f} hf {want:.8f}")
    assert abs(got - want) < 1e-6


def test_mixtral_aux_loss_uniform():
    # perfectly uniform router: f_e = k/E, P_e = 1/E  ->  loss = E * E * (k/E) * (1/E) = k
    logits = np.zeros((16, 8))
    logits[np.arange(16), np.arange(16) % 8] = 1e-9  # break ties deterministically but evenly
    assert abs(ref.mixtral_aux_loss([logits], 1, 8) - 1.0) < 1e-6


# --------------------------------------------------------------------------- Qwen2-MoE
def _qwen2_moe(seed, n_layers=L, **kw):
    base = dict(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=48, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    base.update(kw)
    cfg = transformers.Qwen2MoeConfig(**base)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _randomize(transformers.Qwen2MoeForCausalLM(cfg).eval(), seed)


@pytest.mark.parametrize("kw", [
    {"norm_topk_prob": False},
    {"norm_topk_prob": True},
    {"n_layers": 4, "decoder_sparse_step": 2},
    {"n_layers": 3, "mlp_only_layers": [1]},
])
def test_qwen2_moe_matches_hf(kw):
    model = _qwen2_moe(7, **kw)
    cfg, sd = _saved(model)
    assert set(sd) == set(ref.expected_weight_shapes(cfg))
    for name, shape in ref.expected_weight_shapes(cfg).items():
        assert sd[name].shape == shape, name
    ids = _ids(7)
    _check(ref.forward(cfg, sd, ids), _hf_logits(model, ids), f"qwen2_moe {kw}")


# --------------------------------------------------------------------------- XVERSE-MoE
def _xverse_moe_from_qwen(model, qcfg):
    """XVERSE-MoE == Qwen2-MoE with zero q/k/v biases and zero shared_expert_gate
    (sigmoid(0) = 1/2), once the XVERSE shared down_proj is halved. Zero those in the HF model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) or "shared_expert_gate" in name:
                p.zero_()
    _, sd = _saved(model)
    w = {}
    for k, v in sd.items():
        if k.endswith("proj.bias") or "shared_expert_gate" in k:
            continue
        k2 = k.replace("mlp.gate.weight", "mlp.router.weight").replace("mlp.shared_expert.", "mlp.shared_experts.")
        if "shared_experts.down_proj" in k2:
            v = 0.5 * v
        w[k2] = v
    xcfg = {"model_type": "xverse", "architectures": ["XverseMoeForCausalLM"], "hidden_size": H,
            "intermediate_size": qcfg["moe_intermediate_size"], "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": qcfg["num_hidden_layers"], "vocab_size": V,
            "rms_norm_eps": qcfg["rms_norm_eps"], "rope_theta": 1e6, "num_experts": qcfg["num_experts"],
            "moe_top_k": qcfg["num_experts_per_tok"], "num_shared_experts": 1}
    return xcfg, w


def test_xverse_moe_matches_qwen2_moe_mapping():
    model = _qwen2_moe(11, norm_topk_prob=False)
    qcfg, _ = _saved(model)
    xcfg, w = _xverse_moe_from_qwen(model, qcfg)
    assert set(w) == set(ref.expected_weight_shapes(xcfg))
    ids = _ids(11)
    hf = _hf_logits(model, ids)
    _check(ref.forward(xcfg, w, ids, norm_topk_prob=False), hf, "xverse_moe (no renorm) vs qwen2_moe")
    xcfg["norm_topk_prob"] = False
    _check(ref.forward(xcfg, w, ids), hf, "xverse_moe (config norm_topk_prob false)")
    # default (absent / True) renormalises: differs from the no-renorm model
    xcfg.pop("norm_topk_prob")
    assert np.max(np.abs(ref.forward(xcfg, w, ids) - hf)) > 1e-2


def test_xverse_moe_renorm_with_eps_matches_qwen_renorm():
    model = _qwen2_moe(12, norm_topk_prob=True)
    qcfg, _ = _saved(model)
    xcfg, w = _xverse_moe_from_qwen(model, qcfg)
    ids = _ids(12)
    # qwen renormalises by sum(w); xverse by sum(w) + 1e-6 -> equal to ~1e-6 relative
    _check(ref.forward(xcfg, w, ids), _hf_logits(model, ids), "xverse_moe (renorm+eps) vs qwen2_moe renorm")


def test_route_topk_eps():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    idx, w, _ = ref.route_topk(logits, 2, True, 1e-6)
    assert idx.tolist() == [[0, 1]]
    np.testing.assert_allclose(w, [[0.5 / (0.8 + 1e-6), 0.3 / (0.8 + 1e-6)]], rtol=1e-12)


# --------------------------------------------------------------------------- TeleChat2
TS = 16  # training_seqlen = base_seqlen of the tiny TeleChat


def _telechat_from_llama(model, n_kv=2, n=4):
    hd = H // n
    sd = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    w = {"transformer.word_embeddings.weight": sd["model.embed_tokens.weight"],
         "transformer.ln_f.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(L):
        s, t = f"model.layers.{i}.", f"transformer.h.{i}."
        k = sd[s + "self_attn.k_proj.weight"].reshape(n_kv, hd, H)
        v = sd[s + "self_attn.v_proj.weight"].reshape(n_kv, hd, H)
        w[t + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"]
        w[t + "post_attention_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"]
        w[t + "self_attention.query.weight"] = sd[s + "self_attn.q_proj.weight"]
        w[t + "self_attention.key_value.weight"] = np.stack([k, v], axis=1).reshape(2 * n_kv * hd, H)
        w[t + "self_attention.dense.weight"] = sd[s + "self_attn.o_proj.weight"]
        w[t + "self_attention.dense.bias"] = sd[s + "self_attn.o_proj.bias"]
        w[t + "mlp.gate_proj.weight"] = sd[s + "mlp.gate_proj.weight"]
        w[t + "mlp.up_proj.weight"] = sd[s + "mlp.up_proj.weight"]
        w[t + "mlp.down_proj.weight"] = sd[s + "mlp.down_proj.weight"]
        w[t + "mlp.down_proj.bias"] = sd[s + "mlp.down_proj.bias"]
    cfg = {"model_type": "telechat", "architectures": ["TeleChat2ForCausalLM"], "hidden_size": H, "n_head": n,
           "num_key_value_heads": n_kv, "n_layer": L, "ffn_hidden_size": 96, "vocab_size": V,
           "layer_norm_epsilon": 1e-5, "training_seqlen": TS, "base_seqlen": TS, "seq_length": TS,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    return cfg, w


def _biased_llama(seed, **kw):
    model = _llama(seed, attention_bias=True, mlp_bias=True, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias")):
                p.zero_()
    return model


def test_telechat_matches_biased_llama_within_training_seqlen():
    model = _biased_llama(21)
    cfg, w = _telechat_from_llama(model)
    assert set(w) == set(ref.expected_weight_shapes(cfg))
    for name, shape in ref.expected_weight_shapes(cfg).items():
        assert w[name].shape == shape, name
    ids = _ids(21, S=TS)
    hf = _hf_logits(model, ids)
    _check(ref.forward(cfg, w, ids, rope_fp16_tables=False), hf, "telechat (fp64 tables) vs llama, S=16")
    # default fp16 tables: close but not bit-identical to plain RoPE
    d16 = float(np.max(np.abs(ref.forward(cfg, w, ids) - hf)))
    print(f"telechat fp16 tables vs llama: max|diff| = {d16:.3e}")
    assert 0 < d16 < 5e-2


def test_telechat_key_value_interleave_order_matters():
    model = _biased_llama(22)
    cfg, w = _telechat_from_llama(model)
    ids = _ids(22, S=8)
    good = ref.forward(cfg, w, ids, rope_fp16_tables=False)
    bad = dict(w)
    for i in range(L):
        name = f"transformer.h.{i}.self_attention.key_value.weight"
        kv = w[name].reshape(2, 2, H // 4, H)      # (n_kv, 2, hd, H)
        bad[name] = kv.transpose(1, 0, 2, 3).reshape(-1, H)  # blocked [K0,K1,V0,V1] layout: wrong
    assert np.max(np.abs(ref.forward(cfg, bad, ids, rope_fp16_tables=False) - good)) > 1e-2


def test_telechat_long_sequence_matches_llama_yarn_equivalent():
    """Past training_seqlen: inv_freq from base' and cos/sin scaled by mscale. transformers'
    'yarn' rope with factor 1 keeps inv_freq = 1/base^(2i/d) and multiplies cos/sin by
    attention_factor, so it reproduces the TeleChat2 table for one fixed sequence length."""
    S = 40
    p = ref.telechat_rope_params(S, H // 4, TS, TS)
    assert p["alpha"] == 7                     # ceil(log2(40/16) + 1) = 3 -> 2**3 - 1
    assert abs(p["mscale"] - (1 + 0.1 * math.log(40 / 16))) < 1e-15
    model = _biased_llama(23, rope_parameters={
        "rope_type": "yarn", "rope_theta": p["base"], "factor": 1.0, "attention_factor": p["mscale"],
        "original_max_position_embeddings": 256})
    cfg, w = _telechat_from_llama(model)
    ids = _ids(23, B=1, S=S)
    hf = _hf_logits(model, ids)
    _check(ref.forward(cfg, w, ids, rope_fp16_tables=False), hf,
           "telechat S=40 > training_seqlen vs llama yarn(factor 1, attention_factor=mscale)")
    # the long-context path really is exercised: treating the model as if trained at 40 gives
    # plain RoPE (alpha 1, mscale 1), which must not match
    plain = ref.forward(dict(cfg, training_seqlen=S, base_seqlen=S), w, ids, rope_fp16_tables=False)
    assert np.max(np.abs(plain - hf)) > 1e-2


def _torch_telechat_tables(S, hd, T):
    """The published recipe as MODELS.md describes it, in torch (fp32 -> fp16 -> x mscale -> fp16)."""
    p = ref.telechat_rope_params(S, hd, T, T)
    inv = 1.0 / (p["base"] ** (torch.arange(0, hd, 2).float() / hd))
    t = torch.arange(p["seq_len"], dtype=inv.dtype)
    emb = torch.cat([torch.outer(t, inv)] * 2, dim=-1)
    cos = (emb.cos().half() * p["mscale"]).half()[:S].double().numpy()
    sin = (emb.sin().half() * p["mscale"]).half()[:S].double().numpy()
    return cos, sin


@pytest.mark.parametrize("S,hd,T", [(40, 16, 16), (300, 80, 128), (8192, 128, 8192), (20000, 128, 8192)])
def test_telechat_fp16_tables_match_torch_recipe(S, hd, T):
    c, s = ref.telechat_rope_tables(S, hd, T, T, fp16=True)
    tc, ts = _torch_telechat_tables(S, hd, T)
    mism = int((c != tc).sum() + (s != ts).sum())
    print(f"fp16 tables S={S} hd={hd}: {mism} of {2 * c.size} entries differ from torch CPU fp32 "
          f"(max {max(np.abs(c - tc).max(), np.abs(s - ts).max()):.2e})")
    # torch's fp32 pow is not always correctly rounded (e.g. one inv_freq entry 1 ulp off at
    # S=20000, hd=128), which flips a rare fp16 rounding: ~1.1e-4 of entries there, 1 fp16 ulp each
    assert mism <= 5e-4 * 2 * c.size
    assert max(np.abs(c - tc).max(), np.abs(s - ts).max()) <= 2.0 ** -10


def test_telechat_tables_plain_within_training_seqlen():
    hd = 16
    cos, sin = ref.telechat_rope_tables(TS, hd, TS, TS, fp16=False)
    pc, ps = ref.rope_tables(TS, hd, 10000.0)
    assert np.array_equal(cos, pc) and np.array_equal(sin, ps)
    c16, s16 = ref.telechat_rope_tables(TS, hd, TS, TS, fp16=True)
    assert np.array_equal(c16, c16.astype(np.float16).astype(np.float64))
    assert np.max(np.abs(c16 - pc)) < 1e-3 and np.max(np.abs(s16 - ps)) < 1e-3
    assert np.max(np.abs(c16 - pc)) > 0


def test_telechat_tables_long_sequence_differ_from_plain():
    hd, S = 16, 40
    cos, sin = ref.telechat_rope_tables(S, hd, TS, TS, fp16=False)
    pc, ps = ref.rope_tables(S, hd, 10000.0)
    mscale = 1 + 0.1 * math.log(S / TS)
    assert mscale > 1
    np.testing.assert_allclose(cos[0], mscale)           # position 0: cos = mscale, sin = 0
    np.testing.assert_allclose(sin[0], 0.0)
    assert np.max(np.abs(cos - pc)) > 0.05 and np.max(np.abs(sin - ps)) > 0.05
    base = 10000.0 * 7 ** (hd / (hd - 2))
    inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
    np.testing.assert_allclose(cos[:, : hd // 2], mscale * np.cos(np.outer(np.arange(S), inv)), atol=1e-12)
    np.testing.assert_allclose(sin[:, hd // 2:], mscale * np.sin(np.outer(np.arange(S), inv)), atol=1e-12)
    # fp16 variant: fp16-representable, within fp16 rounding of the fp64 table
    c16, s16 = ref.telechat_rope_tables(S, hd, TS, TS, fp16=True)
    assert np.array_equal(s16, s16.astype(np.float16).astype(np.float64))
    assert np.max(np.abs(c16 - cos)) < 2e-3 and np.max(np.abs(s16 - sin)) < 2e-3


@pytest.mark.parametrize("S,alpha", [(16, 1), (17, 3), (32, 3), (33, 7), (64, 7), (65, 15)])
def test_telechat_alpha_steps(S, alpha):
    assert ref.telechat_rope_params(S, 128, 16, 16)["alpha"] == alpha
    assert ref.telechat_rope_params(S, 128, 16, 16)["seq_len"] == S


def test_telechat_short_sequence_uses_training_seqlen():
    p = ref.telechat_rope_params(3, 128, 8192, 8192)
    assert p == {"seq_len": 8192, "alpha": 1, "base": 10000.0, "mscale": 1.0}


def test_unknown_family_rejected():
    with pytest.raises(ValueError):
        ref.forward({"model_type": "gpt2"}, {}, np.zeros((1, 2), dtype=np.int64))
