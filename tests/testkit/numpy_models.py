"""Independent pure-numpy reference forward passes (a test oracle for mindport).

Written only from the facts in shared/MODELS.md; it shares no code with mindport.
Everything is computed in float64, except TeleChat2's RoPE cos/sin tables, which by
default reproduce the published fp32 -> fp16 -> (x mscale) -> fp16 rounding (the
attention itself is still float64, using the rounded table values).

Families (detected from ``hf_config["model_type"]``):

* ``telechat``  TeleChat2: fused interleaved ``key_value``, biased ``dense`` and
  ``down_proj``, dynamic-NTK RoPE with mscale, GQA, ``layer_norm_epsilon``.
* ``xverse``    dense XVERSE (LLaMA layout) or, when ``num_experts`` is present,
  XVERSE-MoE (softmax router over all experts, top ``moe_top_k``, renormalised as
  ``w / (sum(w) + 1e-6)`` unless ``norm_topk_prob`` is False, shared experts as one
  SwiGLU added with weight 1).
* ``mixtral``   top-k of softmax, renormalised ``w / sum(w)``, experts under the
  transformers-4.x checkpoint names ``block_sparse_moe.experts.{e}.w1/w2/w3``.
* ``qwen2_moe`` q/k/v biases, top ``num_experts_per_tok``, ``norm_topk_prob`` from the
  config, shared expert scaled by ``sigmoid(shared_expert_gate(x))``; dense layers
  where ``mlp_only_layers`` / ``decoder_sparse_step`` say so (transformers' rule).

Public API: ``forward``, ``telechat_rope_tables``, ``telechat_rope_params``,
``rope_tables``, ``route_topk``, ``mixtral_aux_loss``, ``expected_weight_shapes``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

FAMILIES = ("telechat", "xverse", "mixtral", "qwen2_moe")
XVERSE_MOE_RENORM_EPS = 1e-6


# --------------------------------------------------------------------------- helpers
def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _w(weights: dict, name: str) -> np.ndarray:
    try:
        return _f64(weights[name])
    except KeyError:
        raise KeyError(f"reference forward: missing checkpoint tensor {name!r}") from None


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    if b is not None:
        y = y + b
    return y


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _swiglu(x, gate_w, up_w, down_w, down_b=None):
    return _linear(_silu(_linear(x, gate_w)) * _linear(x, up_w), down_w, down_b)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


# --------------------------------------------------------------------------- RoPE
def rope_tables(seq_len: int, hd: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """Plain rotate-half RoPE tables in float64, each [seq_len, hd]."""
    if hd % 2:
        raise ValueError(f"head dim must be even for RoPE, got {hd}")
    inv_freq = 1.0 / (float(base) ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def telechat_rope_params(seq_len_total: int, hd: int, training_seqlen: int,
                         base_seqlen: int, base: float = 10000.0) -> dict[str, float]:
    """TeleChat2 dynamic-NTK parameters for a full forward over ``seq_len_total`` keys.

    seq_len = max(seq_len_total, training_seqlen)
    alpha   = max(2**ceil(log2(seq_len / base_seqlen) + 1) - 1, 1)
    base'   = base * alpha ** (hd / (hd - 2))
    mscale  = 1 if seq_len / training_seqlen <= 1 else 0.1 * ln(seq_len / training_seqlen) + 1
    """
    seq_len = max(int(seq_len_total), int(training_seqlen))
    alpha = max(2 ** math.ceil(math.log2(seq_len / base_seqlen) + 1) - 1, 1)
    ntk_base = base * alpha ** (hd / (hd - 2))
    ratio = seq_len / training_seqlen
    mscale = 1.0 if ratio <= 1 else 0.1 * math.log(ratio) + 1.0
    return {"seq_len": seq_len, "alpha": alpha, "base": ntk_base, "mscale": mscale}


def telechat_rope_tables(seq_len_total: int, hd: int, training_seqlen: int, base_seqlen: int,
                         fp16: bool, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """TeleChat2 cos/sin tables (mscale included) for positions 0..seq_len_total-1.

    Returns float64 arrays [seq_len_total, hd]. With ``fp16`` the values reproduce the
    published rounding: cos/sin computed in fp32, cast to fp16, multiplied by mscale and
    rounded to fp16 again. Without it, everything is float64.
    """
    p = telechat_rope_params(seq_len_total, hd, training_seqlen, base_seqlen, base)
    n = int(seq_len_total)
    if not fp16:
        cos, sin = rope_tables(n, hd, p["base"])
        return cos * p["mscale"], sin * p["mscale"]
    # fp32 stage: each fp32 op is evaluated in float64 and rounded once to fp32 (i.e. correctly
    # rounded fp32, like torch's CPU kernels in practice; numpy's own float32 pow/cos are
    # less accurate and flip ~1% of the fp16 table entries at seq 8192).
    f32 = np.float32
    exponent = (np.arange(0, hd, 2, dtype=f32) / f32(hd)).astype(f32)
    pw = (np.float64(f32(p["base"])) ** exponent.astype(np.float64)).astype(f32)
    inv_freq = (f32(1.0) / pw).astype(f32)
    freqs = np.outer(np.arange(n, dtype=f32), inv_freq).astype(f32)
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    out = []
    for table in (np.cos(emb).astype(f32), np.sin(emb).astype(f32)):
        t16 = table.astype(np.float16)
        t16 = (t16.astype(f32) * f32(p["mscale"])).astype(np.float16)
        out.append(t16.astype(np.float64))
    return out[0], out[1]


# --------------------------------------------------------------------------- attention
def _attention(x, wq, bq, wk, bk, wv, bv, wo, bo, n, n_kv, hd, cos, sin):
    """Causal GQA attention, float64. x [B,S,H]; cos/sin [S,hd]."""
    B, S, _ = x.shape
    if n % n_kv:
        raise ValueError(f"n_head {n} not divisible by n_kv {n_kv}")
    q = _linear(x, wq, bq).reshape(B, S, n, hd).transpose(0, 2, 1, 3)
    k = _linear(x, wk, bk).reshape(B, S, n_kv, hd).transpose(0, 2, 1, 3)
    v = _linear(x, wv, bv).reshape(B, S, n_kv, hd).transpose(0, 2, 1, 3)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    group = n // n_kv
    kv_index = np.arange(n) // group           # query head h reads kv head h // (n / n_kv)
    k = k[:, kv_index]
    v = v[:, kv_index]
    scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(hd)
    mask = np.triu(np.ones((S, S), dtype=bool), k=1)
    scores = np.where(mask, -np.inf, scores)
    probs = _softmax(scores, axis=-1)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, S, n * hd)
    return _linear(out, wo, bo)


# --------------------------------------------------------------------------- routing
def route_topk(logits: np.ndarray, top_k: int, renormalize: bool, eps: float = 0.0):
    """Softmax over all experts, then top-k. Returns (indices [T,k], weights [T,k], probs [T,E]).

    With ``renormalize`` the k weights become ``w / (sum(w) + eps)``.
    """
    probs = _softmax(_f64(logits), axis=-1)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(probs, idx, axis=-1)
    if renormalize:
        w = w / (np.sum(w, axis=-1, keepdims=True) + eps)
    return idx, w, probs


def _moe(x2d, router_w, expert_getter, num_experts, top_k, renormalize, eps):
    """x2d [T,H]. expert_getter(e) -> (gate_w, up_w, down_w)."""
    logits = _linear(x2d, router_w)
    idx, w, _ = route_topk(logits, top_k, renormalize, eps)
    out = np.zeros_like(x2d)
    for e in range(num_experts):
        tok, slot = np.nonzero(idx == e)
        if tok.size == 0:
            continue
        g, u, d = expert_getter(e)
        out[tok] += _swiglu(x2d[tok], g, u, d) * w[tok, slot][:, None]
    return out, logits


# --------------------------------------------------------------------------- configs
def _rope_theta(cfg: dict, default: float) -> float:
    if cfg.get("rope_theta") is not None:
        theta = float(cfg["rope_theta"])
    elif isinstance(cfg.get("rope_parameters"), dict) and cfg["rope_parameters"].get("rope_theta") is not None:
        theta = float(cfg["rope_parameters"]["rope_theta"])
    else:
        theta = float(default)
    for key in ("rope_scaling", "rope_parameters"):
        rs = cfg.get(key)
        if isinstance(rs, dict):
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype not in (None, "default"):
                raise NotImplementedError(f"reference: rope type {rtype!r} not supported")
    return theta


def _n_kv(cfg: dict, n: int) -> int:
    v = cfg.get("num_key_value_heads")
    return n if v is None else int(v)


def _llama_like_dims(cfg: dict) -> dict[str, Any]:
    H = int(cfg["hidden_size"])
    n = int(cfg["num_attention_heads"])
    hd = cfg.get("head_dim")
    hd = H // n if hd is None else int(hd)
    return {"H": H, "n": n, "n_kv": _n_kv(cfg, n), "hd": hd, "L": int(cfg["num_hidden_layers"]),
            "V": int(cfg["vocab_size"]), "eps": float(cfg["rms_norm_eps"])}


def _qwen2_moe_sparse_layers(cfg: dict) -> list[bool]:
    L = int(cfg["num_hidden_layers"])
    only = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    ne = int(cfg.get("num_experts", 0) or 0)
    return [(i not in only) and ne > 0 and (i + 1) % step == 0 for i in range(L)]


def expected_weight_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the reference forward reads, with its shape (MODELS.md names)."""
    cfg = hf_config
    mt = cfg["model_type"]
    shapes: dict[str, tuple[int, ...]] = {}
    if mt == "telechat":
        H, n, V, F = int(cfg["hidden_size"]), int(cfg["n_head"]), int(cfg["vocab_size"]), int(cfg["ffn_hidden_size"])
        n_kv, hd = _n_kv(cfg, n), H // n
        shapes["transformer.word_embeddings.weight"] = (V, H)
        for i in range(int(cfg["n_layer"])):
            p = f"transformer.h.{i}."
            shapes[p + "input_layernorm.weight"] = (H,)
            shapes[p + "self_attention.query.weight"] = (n * hd, H)
            shapes[p + "self_attention.key_value.weight"] = (2 * n_kv * hd, H)
            shapes[p + "self_attention.dense.weight"] = (H, n * hd)
            shapes[p + "self_attention.dense.bias"] = (H,)
            shapes[p + "post_attention_layernorm.weight"] = (H,)
            shapes[p + "mlp.gate_proj.weight"] = (F, H)
            shapes[p + "mlp.up_proj.weight"] = (F, H)
            shapes[p + "mlp.down_proj.weight"] = (H, F)
            shapes[p + "mlp.down_proj.bias"] = (H,)
        shapes["transformer.ln_f.weight"] = (H,)
        shapes["lm_head.weight"] = (V, H)
        return shapes
    if mt not in FAMILIES:
        raise ValueError(f"unknown model_type {mt!r}")
    d = _llama_like_dims(cfg)
    H, n, n_kv, hd, V = d["H"], d["n"], d["n_kv"], d["hd"], d["V"]
    shapes["model.embed_tokens.weight"] = (V, H)
    sparse = _qwen2_moe_sparse_layers(cfg) if mt == "qwen2_moe" else None
    for i in range(d["L"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "self_attn.q_proj.weight"] = (n * hd, H)
        shapes[p + "self_attn.k_proj.weight"] = (n_kv * hd, H)
        shapes[p + "self_attn.v_proj.weight"] = (n_kv * hd, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, n * hd)
        if mt == "qwen2_moe" and cfg.get("qkv_bias", True):
            shapes[p + "self_attn.q_proj.bias"] = (n * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (n_kv * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (n_kv * hd,)
        if mt == "xverse" and cfg.get("num_experts"):
            E, I = int(cfg["num_experts"]), int(cfg["intermediate_size"])
            shapes[p + "mlp.router.weight"] = (E, H)
            for e in range(E):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (I, H)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (I, H)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (H, I)
            ns = int(cfg.get("num_shared_experts", 0) or 0)
            if ns:
                shapes[p + "mlp.shared_experts.gate_proj.weight"] = (ns * I, H)
                shapes[p + "mlp.shared_experts.up_proj.weight"] = (ns * I, H)
                shapes[p + "mlp.shared_experts.down_proj.weight"] = (H, ns * I)
        elif mt == "mixtral":
            E, F = int(cfg["num_local_experts"]), int(cfg["intermediate_size"])
            shapes[p + "block_sparse_moe.gate.weight"] = (E, H)
            for e in range(E):
                shapes[p + f"block_sparse_moe.experts.{e}.w1.weight"] = (F, H)
                shapes[p + f"block_sparse_moe.experts.{e}.w3.weight"] = (F, H)
                shapes[p + f"block_sparse_moe.experts.{e}.w2.weight"] = (H, F)
        elif mt == "qwen2_moe" and sparse[i]:
            E, I = int(cfg["num_experts"]), int(cfg["moe_intermediate_size"])
            S_ = int(cfg["shared_expert_intermediate_size"])
            shapes[p + "mlp.gate.weight"] = (E, H)
            for e in range(E):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (I, H)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (I, H)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (H, I)
            shapes[p + "mlp.shared_expert.gate_proj.weight"] = (S_, H)
            shapes[p + "mlp.shared_expert.up_proj.weight"] = (S_, H)
            shapes[p + "mlp.shared_expert.down_proj.weight"] = (H, S_)
            shapes[p + "mlp.shared_expert_gate.weight"] = (1, H)
        else:  # dense xverse, dense qwen2_moe layer
            F = int(cfg["intermediate_size"])
            shapes[p + "mlp.gate_proj.weight"] = (F, H)
            shapes[p + "mlp.up_proj.weight"] = (F, H)
            shapes[p + "mlp.down_proj.weight"] = (H, F)
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


# --------------------------------------------------------------------------- families
def _forward_telechat(cfg, weights, ids, rope_fp16_tables, router_logits):
    H, n = int(cfg["hidden_size"]), int(cfg["n_head"])
    if H % n:
        raise ValueError("hidden_size must be divisible by n_head")
    n_kv, hd = _n_kv(cfg, n), H // n
    eps = float(cfg["layer_norm_epsilon"])
    B, S = ids.shape
    cos, sin = telechat_rope_tables(S, hd, int(cfg["training_seqlen"]), int(cfg["base_seqlen"]),
                                    fp16=rope_fp16_tables)
    x = _w(weights, "transformer.word_embeddings.weight")[ids]
    for i in range(int(cfg["n_layer"])):
        p = f"transformer.h.{i}."
        h = _rms_norm(x, _w(weights, p + "input_layernorm.weight"), eps)
        kv = _w(weights, p + "self_attention.key_value.weight").reshape(n_kv, 2, hd, H)
        wk = kv[:, 0].reshape(n_kv * hd, H)
        wv = kv[:, 1].reshape(n_kv * hd, H)
        x = x + _attention(h, _w(weights, p + "self_attention.query.weight"), None, wk, None, wv, None,
                           _w(weights, p + "self_attention.dense.weight"),
                           _w(weights, p + "self_attention.dense.bias"), n, n_kv, hd, cos, sin)
        h = _rms_norm(x, _w(weights, p + "post_attention_layernorm.weight"), eps)
        x = x + _swiglu(h, _w(weights, p + "mlp.gate_proj.weight"), _w(weights, p + "mlp.up_proj.weight"),
                        _w(weights, p + "mlp.down_proj.weight"), _w(weights, p + "mlp.down_proj.bias"))
    x = _rms_norm(x, _w(weights, "transformer.ln_f.weight"), eps)
    return _linear(x, _w(weights, "lm_head.weight"))


def _forward_llama_like(cfg, weights, ids, norm_topk_prob, router_logits):
    mt = cfg["model_type"]
    d = _llama_like_dims(cfg)
    H, n, n_kv, hd, eps = d["H"], d["n"], d["n_kv"], d["hd"], d["eps"]
    B, S = ids.shape
    default_theta = {"xverse": 10000.0, "mixtral": 1e6, "qwen2_moe": 10000.0}[mt]
    theta = _rope_theta(cfg, default_theta)
    if mt == "mixtral" and cfg.get("sliding_window") and S > int(cfg["sliding_window"]):
        raise NotImplementedError("reference: Mixtral sliding window not modelled")
    if mt == "qwen2_moe" and cfg.get("use_sliding_window") and S > int(cfg.get("sliding_window") or S):
        raise NotImplementedError("reference: Qwen2-MoE sliding window not modelled")
    cos, sin = rope_tables(S, hd, theta)
    sparse = _qwen2_moe_sparse_layers(cfg) if mt == "qwen2_moe" else None
    xverse_moe = mt == "xverse" and bool(cfg.get("num_experts"))

    x = _w(weights, "model.embed_tokens.weight")[ids]
    for i in range(d["L"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, _w(weights, p + "input_layernorm.weight"), eps)
        if mt == "qwen2_moe" and cfg.get("qkv_bias", True):
            bq, bk, bv = (_w(weights, p + f"self_attn.{t}_proj.bias") for t in "qkv")
        else:
            bq = bk = bv = None
        x = x + _attention(h, _w(weights, p + "self_attn.q_proj.weight"), bq,
                           _w(weights, p + "self_attn.k_proj.weight"), bk,
                           _w(weights, p + "self_attn.v_proj.weight"), bv,
                           _w(weights, p + "self_attn.o_proj.weight"), None, n, n_kv, hd, cos, sin)
        h = _rms_norm(x, _w(weights, p + "post_attention_layernorm.weight"), eps)
        h2 = h.reshape(B * S, H)
        if xverse_moe:
            E, k = int(cfg["num_experts"]), int(cfg["moe_top_k"])
            renorm = norm_topk_prob if norm_topk_prob is not None else cfg.get("norm_topk_prob")
            renorm = True if renorm is None else bool(renorm)
            m = p + "mlp."
            out, logits = _moe(h2, _w(weights, m + "router.weight"),
                               lambda e: tuple(_w(weights, m + f"experts.{e}.{t}_proj.weight")
                                               for t in ("gate", "up", "down")),
                               E, k, renorm, XVERSE_MOE_RENORM_EPS)
            ns = int(cfg.get("num_shared_experts", 0) or 0)
            if ns or (m + "shared_experts.gate_proj.weight") in weights:
                out = out + _swiglu(h2, *(_w(weights, m + f"shared_experts.{t}_proj.weight")
                                          for t in ("gate", "up", "down")))
            router_logits.append(logits)
        elif mt == "mixtral":
            E, k = int(cfg["num_local_experts"]), int(cfg.get("num_experts_per_tok", 2))
            renorm = True if norm_topk_prob is None else bool(norm_topk_prob)
            m = p + "block_sparse_moe."
            out, logits = _moe(h2, _w(weights, m + "gate.weight"),
                               lambda e: tuple(_w(weights, m + f"experts.{e}.{t}.weight")
                                               for t in ("w1", "w3", "w2")),
                               E, k, renorm, 0.0)
            router_logits.append(logits)
        elif mt == "qwen2_moe" and sparse[i]:
            E, k = int(cfg["num_experts"]), int(cfg["num_experts_per_tok"])
            renorm = norm_topk_prob if norm_topk_prob is not None else cfg.get("norm_topk_prob", False)
            m = p + "mlp."
            out, logits = _moe(h2, _w(weights, m + "gate.weight"),
                               lambda e: tuple(_w(weights, m + f"experts.{e}.{t}_proj.weight")
                                               for t in ("gate", "up", "down")),
                               E, k, bool(renorm), 0.0)
            shared = _swiglu(h2, *(_w(weights, m + f"shared_expert.{t}_proj.weight")
                                   for t in ("gate", "up", "down")))
            out = out + _sigmoid(_linear(h2, _w(weights, m + "shared_expert_gate.weight"))) * shared
            router_logits.append(logits)
        else:
            out = _swiglu(h2, *(_w(weights, p + f"mlp.{t}_proj.weight") for t in ("gate", "up", "down")))
        x = x + out.reshape(B, S, H)
    x = _rms_norm(x, _w(weights, "model.norm.weight"), eps)
    return _linear(x, _w(weights, "lm_head.weight"))


def forward(hf_config: dict, weights: dict[str, np.ndarray], input_ids: np.ndarray, *,
            rope_fp16_tables: bool | None = None, norm_topk_prob: bool | None = None,
            return_router_logits: bool = False):
    """Full causal forward (no cache, no padding mask). Returns float64 logits [B,S,V].

    rope_fp16_tables: TeleChat2 fp16 rounding of cos/sin (None -> True for telechat;
        must be None/False for the other families).
    norm_topk_prob: overrides the config's renormalisation of the top-k router weights
        (XVERSE-MoE: None -> config field, absent -> renormalise with +1e-6;
        Qwen2-MoE: None -> config field, absent -> False; Mixtral: None -> True).
    return_router_logits: also return the per-MoE-layer router logits [B*S, E] (float64).
    """
    cfg = dict(hf_config)
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"reference forward: unsupported model_type {mt!r}")
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError("input_ids must be [B, S]")
    ids = ids.astype(np.int64)
    router_logits: list[np.ndarray] = []
    if mt == "telechat":
        fp16 = True if rope_fp16_tables is None else bool(rope_fp16_tables)
        logits = _forward_telechat(cfg, weights, ids, fp16, router_logits)
    else:
        if rope_fp16_tables:
            raise ValueError("rope_fp16_tables is a TeleChat2-only behaviour")
        logits = _forward_llama_like(cfg, weights, ids, norm_topk_prob, router_logits)
    if return_router_logits:
        return logits, router_logits
    return logits


# --------------------------------------------------------------------------- aux loss
def mixtral_aux_loss(router_logits_per_layer: list[np.ndarray], top_k: int, num_experts: int) -> float:
    """Switch/Mixtral load-balancing loss (no attention mask, coefficient NOT applied).

    Over all layers' rows pooled together: f_e = (number of top-k slots that picked e) / rows,
    P_e = mean softmax probability of e; loss = num_experts * sum_e f_e * P_e.
    """
    if not router_logits_per_layer:
        return 0.0
    counts = np.zeros(num_experts, dtype=np.float64)
    prob_sum = np.zeros(num_experts, dtype=np.float64)
    rows = 0
    for logits in router_logits_per_layer:
        logits = _f64(logits).reshape(-1, num_experts)
        idx, _, probs = route_topk(logits, top_k, renormalize=False)
        counts += np.bincount(idx.reshape(-1), minlength=num_experts)
        prob_sum += probs.sum(axis=0)
        rows += logits.shape[0]
    return float(num_experts * np.sum((counts / rows) * (prob_sum / rows)))
