"""CPU backend of the MoE routing operators: C++ kernels run through ``ops.Custom(func_type="aot")``.

The kernels live in ``csrc/moe_routing.cc`` (shipped as package data). On first use the source
is compiled with ``g++ -O3 -shared -fPIC`` into ``$MINDPORT_CACHE`` (default
``~/.cache/mindport/ops``); the library name carries a hash of the source and flags, and it is
built to a temporary file then renamed, so concurrent processes never load a half-written file.
If the compiler is missing or the build fails, one warning is issued and :func:`available`
returns False, so :mod:`mindport.dispatch` falls back to the reference backend.

Forward and backward are both C++ kernels: the backward of the gating/permute op is a scatter-add
of the permuted gradient back onto token rows plus the softmax -> top-k -> renormalisation
Jacobian-vector product; the backward of the combine op gives the expert-output rows and the
weight gradients in one pass.

The kernels stream rows with non-temporal stores (SSE2, x86-64 baseline; plain memcpy elsewhere)
and split copies of 64 MB or more over ``$MINDPORT_OP_THREADS`` threads (default: every core).

MindSpore refuses to create a Custom primitive inside a ``mindspore.jit`` graph, so the
primitives are created at import time (pointing at the library's future path) and shared by all
shapes and every ``top_k``; the library itself is built by :func:`available` (which
``dispatch.get`` calls), or at the latest while the first graph using it is compiled.
"""
from __future__ import annotations

import os

import numpy as np
import mindspore as ms
from mindspore import ops
from mindspore.ops import constexpr

from mindport import dispatch
from mindport.ops._aot import CustomKernels, require

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "moe_routing.cc")


def _int_or_unknown(x: int, factor: int = 1) -> int:
    return -1 if x < 0 else x * factor


def _make_prims(lib: str) -> dict:
    f32, i32 = ms.float32, ms.int32

    def custom(fn, out_shape, out_dtype, bprop=None):
        return ops.Custom(f"{lib}:{fn}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)

    # cfg is float64 [top_k, 3]: its leading dimension tells the shape functions top_k.
    gating_bwd = custom(
        "MoeGatingBackward",
        lambda logits, experts, grad_w, cfg: logits,
        lambda logits, experts, grad_w, cfg: f32,
    )
    permute_bwd = custom(
        "MoePermuteBackward",
        lambda grad_perm, slot_rows, cfg: [grad_perm[0] // cfg[0] if grad_perm[0] >= 0 else -1, grad_perm[1]],
        lambda grad_perm, slot_rows, cfg: grad_perm,
    )

    def gating_permute_bprop(logits, hidden, cfg, out, dout):
        grad_logits = gating_bwd(logits, out[1], dout[0], cfg)
        grad_hidden = permute_bwd(dout[2], out[3], cfg)
        return grad_logits, grad_hidden, ops.zeros_like(cfg)

    gating_permute = custom(
        "MoeGatingPermute",
        lambda logits, hidden, cfg: (
            [logits[0], cfg[0]],
            [logits[0], cfg[0]],
            [_int_or_unknown(logits[0], cfg[0]), hidden[1]],
            [_int_or_unknown(logits[0], cfg[0])],
            [logits[1]],
        ),
        lambda logits, hidden, cfg: (f32, i32, hidden, i32, i32),
        gating_permute_bprop,
    )

    combine_bwd = custom(
        "MoeCombineBackward",
        lambda grad_out, expert_out, slot_rows, weights: (expert_out, weights),
        lambda grad_out, expert_out, slot_rows, weights: (expert_out, f32),
    )

    def combine_bprop(expert_out, slot_rows, weights, out, dout):
        grad_eo, grad_w = combine_bwd(dout, expert_out, slot_rows, weights)
        return grad_eo, ops.zeros_like(slot_rows), grad_w

    combine = custom(
        "MoeUnpermuteCombine",
        lambda expert_out, slot_rows, weights: [weights[0], expert_out[1]],
        lambda expert_out, slot_rows, weights: expert_out,
        combine_bprop,
    )
    return {"gating_permute": gating_permute, "combine": combine}


KERNELS = CustomKernels("moe_routing", SOURCE, _make_prims)


def available() -> bool:
    """True when the C++ library is built (building it on first call) and the primitives exist."""
    return KERNELS.available()


@constexpr(reuse_result=False)
def _cfg(top_k, norm_topk_prob, norm_eps, capacity):
    row = [1.0 if norm_topk_prob else 0.0, float(norm_eps), float(capacity)]
    return ms.Tensor(np.array([row] * int(top_k), dtype=np.float64))


@dispatch.register("moe_gating_permute", "cpu", available=available)
def moe_gating_permute(router_logits, hidden, top_k: int, norm_topk_prob: bool, norm_eps: float, capacity: int):
    """Fused softmax/top-k gating and token permutation (C++). Same contract as the reference."""
    require(__name__, "moe_gating_permute")
    cfg = _cfg(top_k, norm_topk_prob, norm_eps, capacity)
    return KERNELS["gating_permute"](router_logits.astype(ms.float32), hidden, cfg)


@dispatch.register("moe_unpermute_combine", "cpu", available=available)
def moe_unpermute_combine(expert_out, slot_rows, weights):
    """Fused weighted un-permute and combine of expert outputs (C++). Same contract as the reference."""
    require(__name__, "moe_unpermute_combine")
    return KERNELS["combine"](expert_out, slot_rows, weights.astype(ms.float32))
