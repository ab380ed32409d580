"""Core tensor kernels, each behind :mod:`mindport.dispatch`.

Shapes: B batch, S query length, Sk key length, N query heads, Nkv key/value heads,
D head dim. The ``reference`` backends are composite MindSpore ops and run on every
device. The ``ascend`` backends call CANN fused kernels; they are UNEXECUTED (no Ascend
NPU was available while writing them) and written from MindSpore's API documentation.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindport import dispatch


def _on_ascend() -> bool:
    return dispatch.device_target() == "Ascend"


# ---------------------------------------------------------------- RMSNorm
@dispatch.register("rms_norm", "reference")
def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps))``, the statistic in fp32, cast back before the weight.

    Computed on (tokens, hidden): MindSpore's CPU reductions over a 3-D tensor's last axis (and,
    in backward, the weight's over its first two) are several times slower than on a 2-D one."""
    xf = x.astype(ms.float32).reshape(-1, x.shape[-1])
    normed = xf * ops.rsqrt(ops.mean(ops.square(xf), -1, keep_dims=True) + eps)
    return (weight * normed.astype(x.dtype)).reshape(x.shape)


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
    """(-x2, x1) of x = (x1, x2) split in halves along D. ``ops.split``, not two slices: MindSpore's
    CPU StridedSlice costs ~20-30 us per call on a decode step's (B, N, 1, D), Split ~3 us."""
    first, second = ops.split(x, x.shape[-1] // 2, -1)
    return ops.cat((-second, first), -1)


@dispatch.register("rotary", "reference")
def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x (B, N, S, D); cos, sin (B, 1, S, D) in x's dtype."""
    return x * cos + _rotate_half(x) * sin


@dispatch.register("rotary", "ascend", available=_on_ascend)
def rotary_ascend(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # UNEXECUTED
    return ops.rotary_position_embedding(x, cos, sin, 0)


# ---------------------------------------------------------------- attention core
_BMM = ops.BatchMatMul()
_BMM_TB = ops.BatchMatMul(transpose_b=True)
_BMM_TA = ops.BatchMatMul(transpose_a=True)


class _AttentionCore(nn.Cell):
    """``(softmax(q k^T + mask) v, probs)`` for query rows stacked per kv head, with its own backward.

    q (B, Nkv, G*S, D) fp32 (already scaled); k, v (B, Nkv, Sk, D); mask (B|1, 1, S, Sk).
    The backward reads the kept probabilities P and output O and takes the softmax's row term
    from rowsum(dO * O) (D wide) instead of rowsum(dP * P) (Sk wide): dS = P (dP - rowsum(dO O)).
    On CPU this and the transposes folded into the batched products halve the attention's time.
    """

    def construct(self, q, k, v, mask):
        b, n_kv, rows, _ = q.shape
        s, sk = mask.shape[-2], k.shape[2]
        scores = _BMM_TB(q, k.astype(ms.float32)).reshape(b, n_kv, rows // s, s, sk)
        scores = scores + mask.reshape(mask.shape[0], 1, 1, s, sk)
        probs = ops.softmax(scores.reshape(-1, sk), -1).reshape(b, n_kv, rows, sk)  # 2-D: faster on CPU
        return _BMM(probs.astype(v.dtype), v), probs

    def bprop(self, q, k, v, mask, out, dout):
        o, probs = out
        do = dout[0]
        dv = _BMM_TA(probs.astype(v.dtype), do)
        dp = _BMM_TB(do, v).astype(ms.float32)
        row_term = (do.astype(ms.float32) * o.astype(ms.float32)).sum(-1, keepdims=True)
        ds = probs * (dp - row_term)
        dq = _BMM(ds, k.astype(ms.float32))
        dk = _BMM_TA(ds, q).astype(k.dtype)
        return dq, dk, dv.astype(v.dtype), ops.zeros_like(mask)


_ATTENTION_CORE = _AttentionCore()


@dispatch.register("attention", "reference")
def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v with fp32 scores; grouped-query without copying K/V.

    q (B, N, S, D); k, v (B, Nkv, Sk, D); mask additive fp32, broadcastable to (B, 1, S, Sk).
    Query head h reads key/value head h // (N / Nkv).
    """
    b, n, s, d = q.shape
    n_kv = k.shape[1]
    qg = q.astype(ms.float32).reshape(b, n_kv, n // n_kv * s, d) * scale  # heads of a group stacked along rows
    return _ATTENTION_CORE(qg, k, v, mask)[0].reshape(b, n, s, d)


@dispatch.register("attention", "ascend", available=_on_ascend)
def attention_ascend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:  # UNEXECUTED
    n = q.shape[1]
    keep = (mask < -1.0).astype(ms.uint8)  # FlashAttentionScore masks where the mask is 1
    return ops.flash_attention_score(q, k, v, n, attn_mask=keep, scalar_value=scale, input_layout="BNSD")
