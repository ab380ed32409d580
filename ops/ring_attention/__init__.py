"""Ring-attention operators: one attention block with its log-sum-exp, and the LSE merge.

Notation: B batch, N query heads, Nkv key/value heads (N % Nkv == 0), Sq query rows, Sk key rows,
D head dim. Query head h reads key/value head h // (N / Nkv) (grouped-query attention: only the
kv heads are stored or sent).

``ring_block_attention(q[B,N,Sq,D], k[B,Nkv,Sk,D], v, scale, causal) -> (out[B,N,Sq,D], lse f32[B,N,Sq])``
    out = softmax(scale q k^T) v and lse = logsumexp(scale q k^T) over the visible keys: all of them
    (``causal=False``, a full block) or keys j <= i + Sk - Sq (``causal=True``, the diagonal block,
    aligned at the bottom right; requires Sq <= Sk). Differentiable wrt q, k, v (also through lse).

``ring_block_attention_grad(q, k, v, out, lse, dout, dlse, scale, causal) -> (dq, dk, dv)``
    The block's backward given an output/LSE and their cotangents. Called with the *merged*
    out/lse of all blocks of a row (and dlse = 0), it returns this block's share of the gradient
    of the full attention: the ring's backward sums these shares.

``lse_merge(out1, lse1, out2, lse2) -> (out, lse)``: out (..., S, D), lse (..., S)
    Attention over the union of two disjoint key sets from the two partial results,
    numerically stable (shifted by the larger lse). Differentiable.

``lse_merge_grad(out1, lse1, out2, lse2, dout, dlse) -> (dout1, dlse1, dout2, dlse2)``.

Backends (chosen by :mod:`mindport.dispatch`): ``reference`` (composite MindSpore ops, the ground
truth), ``cpu`` (C++ via ``ops.Custom``, built on first use), ``ascend`` (FlashAttentionScore /
FlashAttentionScoreGrad; UNEXECUTED; no ascend merge: the reference is used). The functions below
pick the backend on every call (PYNATIVE) or when a ``mindspore.jit`` graph is compiled.
"""
from __future__ import annotations

from mindspore.ops import constexpr

from mindport import dispatch

from . import reference  # registers the "reference" backends
from . import cpu  # registers the "cpu" backends
from . import ascend  # registers the "ascend" backends

BLOCK = "ring_block_attention"
BLOCK_GRAD = "ring_block_attention_grad"
MERGE = "lse_merge"
MERGE_GRAD = "lse_merge_grad"

# The table dispatch holds, spelled out so that a jit graph can index it with a constant.
_IMPLS = {
    BLOCK: {"reference": reference.block_attention, "cpu": cpu.block_attention, "ascend": ascend.block_attention},
    BLOCK_GRAD: {"reference": reference.block_attention_grad, "cpu": cpu.block_attention_grad,
                 "ascend": ascend.block_attention_grad},
    MERGE: {"reference": reference.lse_merge, "cpu": cpu.lse_merge},
    MERGE_GRAD: {"reference": reference.lse_merge_grad, "cpu": cpu.lse_merge_grad},
}


@constexpr(reuse_result=False)
def _backend(op):
    return dispatch.choose(op)  # plain Python: as a constexpr it also runs while a graph compiles


def block_attention(q, k, v, scale: float, causal: bool):
    """(out, lse) of q against one K/V block; see the module docstring."""
    return _IMPLS[BLOCK][_backend(BLOCK)](q, k, v, scale, causal)


def block_attention_grad(q, k, v, out, lse, dout, dlse, scale: float, causal: bool):
    """(dq, dk, dv) of one block given (merged) out/lse and their cotangents."""
    return _IMPLS[BLOCK_GRAD][_backend(BLOCK_GRAD)](q, k, v, out, lse, dout, dlse, scale, causal)


def lse_merge(out1, lse1, out2, lse2):
    """Merge two partial attention results by their log-sum-exp."""
    return _IMPLS[MERGE][_backend(MERGE)](out1, lse1, out2, lse2)


def lse_merge_grad(out1, lse1, out2, lse2, dout, dlse):
    """Backward of :func:`lse_merge`."""
    return _IMPLS[MERGE_GRAD][_backend(MERGE_GRAD)](out1, lse1, out2, lse2, dout, dlse)


__all__ = ["block_attention", "block_attention_grad", "lse_merge", "lse_merge_grad", "BLOCK", "BLOCK_GRAD",
           "MERGE", "MERGE_GRAD"]
