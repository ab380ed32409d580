"""MoE routing operators: softmax top-k gating + token permutation, and weighted un-permutation.

Notation: T tokens, E experts, H hidden size, k = top_k, N = T*k slots, slot s = t*k + j.

``moe_gating_permute(router_logits[T,E], hidden[T,H], top_k, norm_topk_prob, norm_eps, capacity)``
returns ``(weights, experts, permuted, slot_rows, counts)``:

- probs = softmax(router_logits in float32); the top_k largest per token, ordered by descending
  prob, ties broken by the lower expert index. If ``norm_topk_prob``: weights = w / (sum(w) + norm_eps)
  (norm_eps 0.0 for Mixtral, 1e-6 for XVERSE-MoE). weights f32[T,k], experts i32[T,k].
- Slots are grouped by ascending expert, within one expert in slot order. With ``capacity`` C > 0
  a slot whose rank within its expert is >= C is dropped; capacity 0 means dropless.
- permuted [N,H] (hidden's dtype): kept slots' token rows in that order, then zero rows.
  slot_rows i32[N]: row of slot s in ``permuted`` or -1 if dropped. counts i32[E]: kept slots per expert.
- Differentiable wrt hidden and router_logits (through weights); the integer outputs have no gradient.

``moe_unpermute_combine(expert_out[N,H], slot_rows i32[N], weights f32[T,k]) -> out[T,H]``:
out[t] = sum_j weights[t,j] * expert_out[slot_rows[t*k+j]], dropped slots add 0, accumulated in
float32, returned in expert_out's dtype. Differentiable wrt expert_out and weights.

Backends (chosen by :mod:`mindport.dispatch`): ``reference`` (composite MindSpore ops),
``cpu`` (C++ kernels via ``ops.Custom``, built on first use), ``ascend`` (CANN fused kernels,
unexecuted). The two functions below pick the backend on every call (PYNATIVE) or when a
``mindspore.jit`` graph is compiled; :func:`mindport.dispatch.get` returns a backend directly
(call it outside jit: ``dispatch.choose`` is plain Python that a graph cannot parse).
"""
from __future__ import annotations

from mindspore.ops import constexpr

from mindport import dispatch

from . import reference  # registers the "reference" backends
from . import cpu  # registers the "cpu" backends
from . import ascend  # registers the "ascend" backends

GATING_PERMUTE = "moe_gating_permute"
UNPERMUTE_COMBINE = "moe_unpermute_combine"

# The same table dispatch holds, spelled out so that a jit graph can index it with a constant.
_IMPLS = {
    GATING_PERMUTE: {
        "reference": reference.moe_gating_permute,
        "cpu": cpu.moe_gating_permute,
        "ascend": ascend.moe_gating_permute,
    },
    UNPERMUTE_COMBINE: {
        "reference": reference.moe_unpermute_combine,
        "cpu": cpu.moe_unpermute_combine,
        "ascend": ascend.moe_unpermute_combine,
    },
}


@constexpr(reuse_result=False)
def _backend(op):
    # dispatch.choose is plain Python (imports, os.environ): as a constexpr it runs in the
    # interpreter even while a jit graph is compiled, and the graph sees the backend's name.
    return dispatch.choose(op)


def moe_gating_permute(router_logits, hidden, top_k: int, norm_topk_prob: bool, norm_eps: float, capacity: int):
    """Softmax top-k gating and permutation of token rows; see the module docstring."""
    fn = _IMPLS[GATING_PERMUTE][_backend(GATING_PERMUTE)]
    return fn(router_logits, hidden, top_k, norm_topk_prob, norm_eps, capacity)


def moe_unpermute_combine(expert_out, slot_rows, weights):
    """Weighted sum of each token's expert outputs back in token order; see the module docstring."""
    return _IMPLS[UNPERMUTE_COMBINE][_backend(UNPERMUTE_COMBINE)](expert_out, slot_rows, weights)


__all__ = ["moe_gating_permute", "moe_unpermute_combine", "GATING_PERMUTE", "UNPERMUTE_COMBINE"]
