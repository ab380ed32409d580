"""Reference backend of the MoE routing operators: composite MindSpore ops, the ground truth.

Static shapes only (no ``.asnumpy()``), so it runs in PYNATIVE mode and inside ``mindspore.jit``.
Gradients come from MindSpore's automatic differentiation of the composite ops.

Tie-breaking: the top-k experts are the first ``top_k`` entries of a descending *stable* sort of
the probabilities (``ops.sort``; MindSpore's CPU Sort kernel uses ``std::stable_sort``), so equal
probabilities keep the lower expert index first. ``ops.topk`` is not used because its CPU kernel
does not order ties by index.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mindport import dispatch


def _routing_rows(experts_flat, num_experts: int, capacity: int):
    """Row in the permuted tensor of every slot (-1 if dropped), kept counts, and the inverse map.

    experts_flat: int32 [N] expert of slot s = t*k + j. Slots are grouped by expert, within one
    expert in slot order; slots whose rank within their expert is >= capacity are dropped.
    Returns (slot_rows [N], counts [E], src_slot [N] = slot held by each permuted row, kept_total).
    """
    n = experts_flat.shape[0]
    expert_ids = ops.arange(num_experts, dtype=ms.int32)
    onehot = (experts_flat.reshape(n, 1) == expert_ids.reshape(1, num_experts)).astype(ms.int32)  # [N, E]
    # (integer sums come back as int64: keep everything int32)
    rank = ((ops.cumsum(onehot, 0) * onehot).sum(1) - 1).astype(ms.int32)  # rank of slot s within its expert
    counts_all = onehot.sum(0).astype(ms.int32)
    if capacity > 0:
        kept = rank < capacity
        counts = ops.minimum(counts_all, ms.Tensor(capacity, ms.int32))
    else:
        kept = ops.ones_like(rank).astype(ms.bool_)
        counts = counts_all
    offsets = (ops.cumsum(counts, 0) - counts).astype(ms.int32)  # first row of each expert
    row = ops.gather(offsets, experts_flat, 0) + rank
    minus_one = ops.full_like(row, -1)
    slot_rows = ops.where(kept, row, minus_one)
    kept_total = counts.sum().astype(ms.int32)
    # Give dropped slots the rows after the kept total (in slot order) so that the destination of
    # every slot is a permutation of [0, N), then invert it with a unique-index scatter.
    dropped_i = (~kept).astype(ms.int32)
    dest = ops.where(kept, row, kept_total + ops.cumsum(dropped_i, 0).astype(ms.int32) - 1)
    src_slot = ops.tensor_scatter_update(ops.zeros(n, ms.int32), dest.reshape(n, 1), ops.arange(n, dtype=ms.int32))
    return slot_rows, counts, src_slot, kept_total


@dispatch.register("moe_gating_permute", "reference")
def moe_gating_permute(router_logits, hidden, top_k: int, norm_topk_prob: bool, norm_eps: float, capacity: int):
    """Softmax top-k gating plus permutation of token rows into expert-grouped order.

    Returns (weights f32[T,k], experts i32[T,k], permuted [T*k,H] (hidden's dtype),
    slot_rows i32[T*k], counts i32[E]). See ``mindport.ops.moe_routing`` for the full contract.
    """
    t, e = router_logits.shape
    h = hidden.shape[1]
    k = int(top_k)
    n = t * k
    probs = ops.softmax(router_logits.astype(ms.float32), axis=-1)
    _, order = ops.sort(probs, axis=-1, descending=True)
    experts = order[:, :k].astype(ms.int32)
    weights = ops.gather_elements(probs, 1, experts)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + norm_eps)
    slot_rows, counts, src_slot, kept_total = _routing_rows(experts.reshape(n), e, int(capacity))
    token = src_slot // k
    # gather in float32 so that the gradient (a scatter-add over the k copies of a token)
    # accumulates in float32 whatever hidden's dtype, as the compiled backend does
    src = hidden if hidden.dtype == ms.float32 else hidden.astype(ms.float32)
    gathered = ops.gather(src, token, 0)
    valid = (ops.arange(n, dtype=ms.int32) < kept_total).reshape(n, 1)
    permuted = ops.where(valid, gathered, ops.zeros((1, h), ms.float32))
    if hidden.dtype != ms.float32:
        permuted = permuted.astype(hidden.dtype)
    return weights, experts, permuted, slot_rows, counts


@dispatch.register("moe_unpermute_combine", "reference")
def moe_unpermute_combine(expert_out, slot_rows, weights):
    """out[t] = sum_j weights[t,j] * expert_out[slot_rows[t*k+j]] (dropped slots add 0), fp32 sums."""
    n, h = expert_out.shape
    t, k = weights.shape
    kept = slot_rows >= 0
    # cast before the gather so that the gradient's scatter-add (rows used by several slots, if
    # slot_rows did not come from moe_gating_permute) also accumulates in float32
    src = expert_out if expert_out.dtype == ms.float32 else expert_out.astype(ms.float32)
    rows = ops.gather(src, ops.maximum(slot_rows, 0), 0)
    w = ops.where(kept, weights.reshape(n), ops.zeros((n,), ms.float32))
    out = (rows.reshape(t, k, h) * w.reshape(t, k, 1)).sum(1)
    if expert_out.dtype != ms.float32:
        out = out.astype(expert_out.dtype)
    return out
