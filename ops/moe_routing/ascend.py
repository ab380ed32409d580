"""Ascend backend of the MoE routing operators, on MindSpore's fused CANN kernels.

UNEXECUTED: no Ascend NPU was available; written from the API documentation
(MindSpore 2.10 docstrings of MoeGatingTopKSoftmax, MoeInitRoutingV2 and MoeFinalizeRouting,
and the CANN aclnnMoeInitRoutingV2 page). Expect to fix details on first contact with hardware.

What it does, and where it deliberately leans on composite ops:

- Expert choice uses ``MoeGatingTopKSoftmax`` (inference op, no gradient). The weights are then
  recomputed differentiably as ``gather(softmax(logits), experts)`` (a [T,E] op, cheap) and
  renormalised, so the gradient wrt the logits matches the contract. CANN does not document how
  that kernel orders exactly tied probabilities; the contract (lower expert index first) is only
  guaranteed by the reference and cpu backends.
- Dropless permutation (``capacity == 0``) uses ``MoeInitRoutingV2`` with drop_pad_mode=0 and
  per-expert counts (flag 2): its expanded_x / expanded_row_idx / counts are, per the docs, exactly
  this contract's permuted / slot_rows / counts (slot index t*k+j, stable expert sort). With
  ``capacity > 0`` the kernel's Drop/Pad mode returns a padded [E, C, H] layout instead of the
  contract's compact one, so that case runs the reference composite ops.
- Combine uses ``MoeFinalizeRouting`` with x1 = 0, scales = weights (dropped slots given weight 0
  and routed to the unused tail rows, since the kernel wants a permutation of [0, N)), and its
  expanded_row_idx in the documented k-major order (index i + j*T).
  The kernel computes in expert_out's dtype, so for 16-bit expert outputs the sum is not
  float32-accumulated as the contract asks.
- Backward passes are composite gathers/sums (cells with a custom ``bprop``), not fused kernels.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from mindport import dispatch

from . import reference


def available() -> bool:
    try:
        return dispatch.device_target() == "Ascend"
    except Exception:  # noqa: BLE001
        return False


class _Permute(nn.Cell):
    """Dropless MoeInitRoutingV2 with a composite backward (sum of each token's permuted grads)."""

    def __init__(self):
        super().__init__()
        from mindspore.ops.auto_generate import MoeInitRoutingV2

        self.init_routing = MoeInitRoutingV2()

    def construct(self, hidden, experts, expert_ids):
        # expert_ids: int32 [E]; only its (static) length is used, as the kernel's expert_num
        permuted, slot_rows, counts, _ = self.init_routing(hidden, experts, 0, 0, expert_ids.shape[0], 0, 2, False)
        return permuted, slot_rows, counts

    def bprop(self, hidden, experts, expert_ids, out, dout):
        t, k = experts.shape
        grad_rows = ops.gather(dout[0], out[1], 0).astype(ms.float32)  # dropless: every slot has a row
        grad_hidden = grad_rows.reshape(t, k, -1).sum(1).astype(hidden.dtype)
        return grad_hidden, ops.zeros_like(experts), ops.zeros_like(expert_ids)


class _Combine(nn.Cell):
    """MoeFinalizeRouting with a composite backward."""

    def __init__(self):
        super().__init__()
        from mindspore.ops.auto_generate import MoeFinalizeRouting

        self.finalize = MoeFinalizeRouting()

    def construct(self, expert_out, slot_rows, weights):
        n, h = expert_out.shape
        t, k = weights.shape
        kept = slot_rows >= 0
        kept_total = kept.astype(ms.int32).sum().astype(ms.int32)
        dropped = (~kept).astype(ms.int32)
        tail_rows = kept_total + ops.cumsum(dropped, 0).astype(ms.int32) - 1
        dest = ops.where(kept, slot_rows, tail_rows)  # a permutation of [0, N)
        scales = ops.where(kept, weights.reshape(n), ops.zeros((n,), ms.float32)).reshape(t, k)
        row_idx_k_major = dest.reshape(t, k).transpose(1, 0).reshape(n)
        zeros = ops.zeros((t, h), expert_out.dtype)
        bias = ops.zeros((1, h), expert_out.dtype)
        experts_dummy = ops.zeros((t, k), ms.int32)
        return self.finalize(expert_out, zeros, None, bias, scales.astype(expert_out.dtype), row_idx_k_major,
                             experts_dummy)

    def bprop(self, expert_out, slot_rows, weights, out, dout):
        n, h = expert_out.shape
        t, k = weights.shape
        kept = slot_rows >= 0
        g = dout.astype(ms.float32)  # [T, H]
        rows = ops.gather(expert_out, ops.maximum(slot_rows, 0), 0).astype(ms.float32).reshape(t, k, h)
        grad_w = ops.where(kept.reshape(t, k), (rows * g.reshape(t, 1, h)).sum(-1), ops.zeros((t, k), ms.float32))
        contrib = (g.reshape(t, 1, h) * weights.reshape(t, k, 1)).reshape(n, h)
        contrib = ops.where(kept.reshape(n, 1), contrib, ops.zeros((1, h), ms.float32))
        idx = ops.where(kept, slot_rows, ops.full_like(slot_rows, n))  # dropped slots go to a dummy row
        grad_eo = ops.unsorted_segment_sum(contrib, idx, n + 1)[:n]
        return grad_eo.astype(expert_out.dtype), ops.zeros_like(slot_rows), grad_w


_CELLS: dict = {}


def _create_cells() -> None:
    from mindspore.ops.auto_generate import MoeGatingTopKSoftmax

    _CELLS.update(gating=MoeGatingTopKSoftmax(), permute=_Permute(), combine=_Combine())


@constexpr(reuse_result=False)
def _require_cells(op_name):
    # Runs in Python even during jit compilation. A graph cannot create primitives or cells, so the
    # first call of these functions must happen in PYNATIVE mode or after device_target="Ascend"
    # was set before this module was imported (then they were created at import, below).
    if not _CELLS:
        _create_cells()
    return True


if available():
    _create_cells()


@dispatch.register("moe_gating_permute", "ascend", available=available)
def moe_gating_permute(router_logits, hidden, top_k: int, norm_topk_prob: bool, norm_eps: float, capacity: int):
    """Fused gating (expert choice) + MoeInitRoutingV2 permutation. Same contract as the reference."""
    if capacity > 0:
        return reference.moe_gating_permute(router_logits, hidden, top_k, norm_topk_prob, norm_eps, capacity)
    _require_cells("moe_gating_permute")
    c = _CELLS
    logits = router_logits.astype(ms.float32)
    _, experts, _ = c["gating"](logits, None, top_k)
    experts = ops.stop_gradient(experts)
    weights = ops.gather_elements(ops.softmax(logits, axis=-1), 1, experts)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + norm_eps)
    expert_ids = ops.arange(router_logits.shape[1], dtype=ms.int32)
    permuted, slot_rows, counts = c["permute"](hidden, experts, expert_ids)
    return weights, experts, permuted, slot_rows, counts


@dispatch.register("moe_unpermute_combine", "ascend", available=available)
def moe_unpermute_combine(expert_out, slot_rows, weights):
    """MoeFinalizeRouting weighted combine. Same contract as the reference (16-bit sums aside)."""
    _require_cells("moe_unpermute_combine")
    return _CELLS["combine"](expert_out, slot_rows, weights.astype(ms.float32))
