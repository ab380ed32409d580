"""Reference backend of the ring-attention operators: composite MindSpore ops, the ground truth.

Scores come from float32 matmuls; the softmax statistics (exp, log, sums: max, lse, the
probabilities before they are rounded to float32) are computed in float64, because MindSpore's
CPU float32 ``exp``/``softmax`` are only accurate to ~5e-6 relative (measured: exp 3e-6..8e-6,
softmax 6e-6, log 1.6e-6 absolute), too coarse for a ground truth checked at 1e-6.

Static shapes, so it runs in PYNATIVE mode and inside ``mindspore.jit``. The forward functions
are differentiable by MindSpore's automatic differentiation (including the gradient that flows
into ``lse``); the ``*_grad`` functions are the same derivatives written out, which the ring's
backward pass calls with the merged (global) ``out`` and ``lse``.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from mindport import dispatch

NEG_INF = float("-inf")
F64 = ms.float64


def _visible(sq: int, sk: int, causal: bool):
    """Bool (Sq, Sk): query i sees key j (bottom-right aligned diagonal when causal), or None."""
    if not causal:
        return None
    i = ops.arange(sq, dtype=ms.int32).reshape(sq, 1)
    j = ops.arange(sk, dtype=ms.int32).reshape(1, sk)
    return j <= i + (sk - sq)


def _scores(q: Tensor, k: Tensor, scale: float, causal: bool) -> Tensor:
    """Scaled scores (B, Nkv, G, Sq, Sk) in float32, -inf where masked."""
    b, n, sq, d = q.shape
    n_kv, sk = k.shape[1], k.shape[2]
    g = n // n_kv
    qg = q.astype(ms.float32).reshape(b, n_kv, g * sq, d)  # heads of a group stacked along rows
    s = ops.matmul(qg, k.astype(ms.float32).swapaxes(-1, -2)) * scale
    s = s.reshape(b, n_kv, g, sq, sk)
    visible = _visible(sq, sk, causal)
    if visible is not None:
        s = ops.where(visible, s, ops.full((), NEG_INF, dtype=ms.float32))
    return s


@dispatch.register("ring_block_attention", "reference")
def block_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """One attention block: out (B, N, Sq, D) in q's dtype and lse (B, N, Sq) float32.

    q (B, N, Sq, D); k, v (B, Nkv, Sk, D); query head h reads kv head h // (N / Nkv).
    ``causal``: query i sees keys j <= i + Sk - Sq (requires Sq <= Sk); else every key.
    """
    b, n, sq, d = q.shape
    n_kv, sk = k.shape[1], k.shape[2]
    s = _scores(q, k, scale, causal).astype(F64)  # (B, Nkv, G, Sq, Sk)
    m = ops.stop_gradient(s.max(-1, keepdims=True))  # stabiliser only: lse's gradient does not depend on it
    lse = m + ops.log(ops.exp(s - m).sum(-1, keepdims=True))
    p = ops.exp(s - lse).astype(ms.float32).reshape(b, n_kv, -1, sk)  # (B, Nkv, G*Sq, Sk)
    out = ops.matmul(p, v.astype(ms.float32)).reshape(b, n, sq, d)
    return out.astype(q.dtype), lse.astype(ms.float32).reshape(b, n, sq)


@dispatch.register("ring_block_attention_grad", "reference")
def block_attention_grad(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor,
                         scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one block given the output ``out``, ``lse`` and their cotangents.

    With the block's own out/lse these are the exact gradients of :func:`block_attention`; with
    the merged out/lse of several blocks they are this block's share of the merged gradients:
    p = exp(scale q k^T - lse), delta = rowsum(dout * out) - dlse, ds = p (dout v^T - delta),
    dq = scale ds k, dk = scale ds^T q, dv = p^T dout (dk, dv summed over a kv head's query heads).
    """
    b, n, sq, d = q.shape
    n_kv, sk = k.shape[1], k.shape[2]
    g = n // n_kv
    f32 = ms.float32
    s = _scores(q, k, scale, causal)  # (B, Nkv, G, Sq, Sk)
    p = ops.exp(s.astype(F64) - lse.astype(F64).reshape(b, n_kv, g, sq, 1)).astype(f32)
    do = dout.astype(f32).reshape(b, n_kv, g * sq, d)
    dv = ops.matmul(p.reshape(b, n_kv, g * sq, sk).swapaxes(-1, -2), do)  # (B, Nkv, Sk, D)
    dp = ops.matmul(do, v.astype(f32).swapaxes(-1, -2)).reshape(b, n_kv, g, sq, sk)
    delta = (dout.astype(f32) * out.astype(f32)).sum(-1) - dlse.astype(f32)  # (B, N, Sq)
    ds = (p * (dp - delta.reshape(b, n_kv, g, sq, 1)) * scale).reshape(b, n_kv, g * sq, sk)
    dq = ops.matmul(ds, k.astype(f32)).reshape(b, n, sq, d)
    dk = ops.matmul(ds.swapaxes(-1, -2), q.astype(f32).reshape(b, n_kv, g * sq, d))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _merge_weights(lse1: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 weights e^(lse_k - lse) and the merged lse (statistics in float64)."""
    l1, l2 = lse1.astype(F64), lse2.astype(F64)
    m = ops.stop_gradient(ops.maximum(l1, l2))
    lse = m + ops.log(ops.exp(l1 - m) + ops.exp(l2 - m))
    return ops.exp(l1 - lse).astype(ms.float32), ops.exp(l2 - lse).astype(ms.float32), lse.astype(ms.float32)


@dispatch.register("lse_merge", "reference")
def lse_merge(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of two key sets from the two partial results.

    out (..., S, D), lse (..., S) float32: lse = log(e^lse1 + e^lse2),
    out = e^(lse1 - lse) out1 + e^(lse2 - lse) out2 (stable: shifted by the larger lse).
    Every row needs at least one finite lse.
    """
    w1, w2, lse = _merge_weights(lse1.astype(ms.float32), lse2.astype(ms.float32))
    out = w1.expand_dims(-1) * out1.astype(ms.float32) + w2.expand_dims(-1) * out2.astype(ms.float32)
    return out.astype(out1.dtype), lse


@dispatch.register("lse_merge_grad", "reference")
def lse_merge_grad(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor, dout: Tensor,
                   dlse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dout1, dlse1, dout2, dlse2) of :func:`lse_merge`: with w_k = e^(lse_k - lse),
    dout_k = w_k dout and dlse_k = w_k (rowsum(dout * (out_k - out)) + dlse)."""
    f32 = ms.float32
    w1, w2, _ = _merge_weights(lse1.astype(f32), lse2.astype(f32))
    g = dout.astype(f32)
    dot = (g * (out1.astype(f32) - out2.astype(f32))).sum(-1)  # out1 - out = w2 (out1 - out2)
    dl = dlse.astype(f32)
    d1 = (w1.expand_dims(-1) * g).astype(out1.dtype)
    d2 = (w2.expand_dims(-1) * g).astype(out2.dtype)
    return d1, w1 * (w2 * dot + dl), d2, w2 * (dl - w1 * dot)
