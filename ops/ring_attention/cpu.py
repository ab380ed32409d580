"""CPU backend of the ring-attention operators: C++ kernels run through ``ops.Custom(func_type="aot")``.

The kernels live in ``csrc/ring_attention.cc`` (shipped as package data): the block forward streams
key tiles with an online softmax (running max and sum, so the score matrix is never held), the
block backward recomputes each tile's probabilities from the given ``lse``, and the LSE merge and
its backward are one pass over the rows. float32 inside; other dtypes are cast by the wrappers.

The library is built on first use, like ``mindport.ops.moe_routing.cpu``: ``g++ -O3 -shared -fPIC``
into ``$MINDPORT_CACHE`` (default ``~/.cache/mindport/ops``), named by a hash of the source and
flags, written to a temporary file and renamed (so concurrent processes never load a half-written
file). Without a compiler, one warning is issued and :func:`available` is False, so
:mod:`mindport.dispatch` falls back to the reference backend.

The Custom primitives are created at import time (MindSpore cannot create them inside a jit graph)
and shared by all shapes; ``scale`` and ``causal`` travel in a float64 [2] tensor.
"""
from __future__ import annotations

import os

import numpy as np
import mindspore as ms
from mindspore import ops
from mindspore.ops import constexpr

from mindport import dispatch
from mindport.ops._aot import CustomKernels, require

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "ring_attention.cc")


def _make_prims(lib: str) -> dict:
    f32 = ms.float32

    def custom(fn, out_shape, out_dtype, bprop=None):
        return ops.Custom(f"{lib}:{fn}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)

    grad = custom("RingBlockBackward",
                  lambda q, k, v, o, l, do, dl, cfg: (q, k, v),
                  lambda q, k, v, o, l, do, dl, cfg: (f32, f32, f32))

    def block_bprop(q, k, v, cfg, out, dout):
        dq, dk, dv = grad(q, k, v, out[0], out[1], dout[0], dout[1], cfg)
        return dq, dk, dv, ops.zeros_like(cfg)

    block = custom("RingBlockForward", lambda q, k, v, cfg: (q, q[:3]), lambda q, k, v, cfg: (f32, f32), block_bprop)

    merge_grad = custom("LseMergeBackward",
                        lambda o1, l1, o2, l2, g, gl: (o1, l1, o2, l2),
                        lambda o1, l1, o2, l2, g, gl: (f32, f32, f32, f32))

    def merge_bprop(o1, l1, o2, l2, out, dout):
        return merge_grad(o1, l1, o2, l2, dout[0], dout[1])

    merge = custom("LseMerge", lambda o1, l1, o2, l2: (o1, l1), lambda o1, l1, o2, l2: (f32, f32), merge_bprop)
    return {"block": block, "grad": grad, "merge": merge, "merge_grad": merge_grad}


KERNELS = CustomKernels("ring_attention", SOURCE, _make_prims)


def available() -> bool:
    """True when the C++ library is built (building it on first call) and the primitives exist."""
    return KERNELS.available()


@constexpr(reuse_result=False)
def _cfg(scale, causal):
    return ms.Tensor(np.array([float(scale), 1.0 if causal else 0.0], dtype=np.float64))


@constexpr
def _check_causal(sq, sk, causal):
    if causal and sq > sk:
        raise ValueError(f"ring_block_attention: a causal block needs Sq <= Sk, got Sq={sq}, Sk={sk}")
    return True


def _f32(x):
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


@dispatch.register("ring_block_attention", "cpu", available=available)
def block_attention(q, k, v, scale: float, causal: bool):
    """C++ block attention (online softmax over key tiles). Same contract as the reference."""
    require(__name__, "ring_block_attention")
    _check_causal(q.shape[2], k.shape[2], causal)
    out, lse = KERNELS["block"](_f32(q), _f32(k), _f32(v), _cfg(scale, causal))
    return (out if q.dtype == ms.float32 else out.astype(q.dtype)), lse


@dispatch.register("ring_block_attention_grad", "cpu", available=available)
def block_attention_grad(q, k, v, out, lse, dout, dlse, scale: float, causal: bool):
    """C++ block backward given (possibly merged) out/lse. Same contract as the reference."""
    require(__name__, "ring_block_attention_grad")
    _check_causal(q.shape[2], k.shape[2], causal)
    dq, dk, dv = KERNELS["grad"](_f32(q), _f32(k), _f32(v), _f32(out), _f32(lse), _f32(dout), _f32(dlse),
                                _cfg(scale, causal))
    if q.dtype != ms.float32:
        dq, dk, dv = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
    return dq, dk, dv


@dispatch.register("lse_merge", "cpu", available=available)
def lse_merge(out1, lse1, out2, lse2):
    """C++ LSE merge. Same contract as the reference."""
    require(__name__, "lse_merge")
    out, lse = KERNELS["merge"](_f32(out1), _f32(lse1), _f32(out2), _f32(lse2))
    return (out if out1.dtype == ms.float32 else out.astype(out1.dtype)), lse


@dispatch.register("lse_merge_grad", "cpu", available=available)
def lse_merge_grad(out1, lse1, out2, lse2, dout, dlse):
    """C++ LSE merge backward. Same contract as the reference."""
    require(__name__, "lse_merge_grad")
    d1, l1, d2, l2 = KERNELS["merge_grad"](_f32(out1), _f32(lse1), _f32(out2), _f32(lse2), _f32(dout), _f32(dlse))
    if out1.dtype != ms.float32:
        d1, d2 = d1.astype(out1.dtype), d2.astype(out2.dtype)
    return d1, l1, d2, l2
