"""Core tensor kernels, each behind :mod:`mindport.dispatch`.

Shapes: B batch, S query length, Sk key length, N query heads, Nkv key/value heads,
D head dim. The ``reference`` backends are composite MindSpore ops and run on every
device. The ``ascend`` backends call CANN fused kernels; they are UNEXECUTED (no Ascend
NPU was available while writing them) and written from MindSpore's API documentation.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from mindport import dispatch


def _on_ascend() -> bool:
    return dispatch.device_target() == "Ascend"


# ---------------------------------------------------------------- RMSNorm
@dispatch.register("rms_norm", "reference")
def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps))``, the statistic in fp32, cast back before the weight."""
    xf = x.astype(ms.float32)
    normed = xf * ops.rsqrt(ops.mean(ops.square(xf), -1, keep_dims=True) + eps)
    return weight * normed.astype(x.dtype)


@dispatch.register("rms_norm", "ascend", available=_on_ascend)
def rms_norm_ascend(x: Tensor, weight: Tensor, eps: float) -> Tensor:  # UNEXECUTED
    return ops.rms_norm(x, weight, eps)[0]


# ---------------------------------------------------------------- SwiGLU
@dispatch.register("swiglu", "reference")
def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return ops.silu(gate) * up


@dispatch.register("swiglu", "ascend", available=_on_ascend)
def swiglu_ascend(gate: Tensor, up: Tensor) -> Tensor:  # UNEXECUTED
    return ops.swiglu(ops.cat((gate, up), -1), -1)


# ---------------------------------------------------------------- rotary embedding
def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


@dispatch.register("rotary", "reference")
def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x (B, N, S, D); cos, sin (B, 1, S, D) in x's dtype."""
    return x * cos + _rotate_half(x) * sin


@dispatch.register("rotary", "ascend", available=_on_ascend)
def rotary_ascend(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # UNEXECUTED
    return ops.rotary_position_embedding(x, cos, sin, 0)


# ---------------------------------------------------------------- attention core
@dispatch.register("attention", "reference")
def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v with fp32 scores; grouped-query without copying K/V.

    q (B, N, S, D); k, v (B, Nkv, Sk, D); mask additive fp32, broadcastable to (B, 1, S, Sk).
    Query head h reads key/value head h // (N / Nkv).
    """
    b, n, s, d = q.shape
    n_kv, sk = k.shape[1], k.shape[2]
    group = n // n_kv
    qg = q.reshape(b, n_kv, group * s, d)  # (B, Nkv, G*S, D): heads of a group stacked along rows
    scores = ops.matmul(qg.astype(ms.float32), k.astype(ms.float32).swapaxes(-1, -2)) * scale
    scores = scores.reshape(b, n_kv, group, s, sk) + mask.reshape(mask.shape[0], 1, 1, s, sk)
    probs = ops.softmax(scores, -1).astype(v.dtype).reshape(b, n_kv, group * s, sk)
    return ops.matmul(probs, v).reshape(b, n, s, d)


@dispatch.register("attention", "ascend", available=_on_ascend)
def attention_ascend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:  # UNEXECUTED
    n = q.shape[1]
    keep = (mask < -1.0).astype(ms.uint8)  # FlashAttentionScore masks where the mask is 1
    return ops.flash_attention_score(q, k, v, n, attn_mask=keep, scalar_value=scale, input_layout="BNSD")
