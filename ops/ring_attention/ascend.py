"""Ascend backend of the ring-attention block operator, on CANN's FlashAttentionScore.

UNEXECUTED: no Ascend NPU was available; written from the MindSpore 2.10 docstrings of
FlashAttentionScore / FlashAttentionScoreGrad. Expect to fix details on first contact with hardware.

- Forward: ``FlashAttentionScore`` (layout BNSD, grouped-query attention native: N2 divides N1),
  full blocks without a mask (sparse_mode 0), causal blocks with sparse_mode 3 ("rightDownCausal",
  the bottom-right aligned diagonal of this operator's contract) and the compressed 2048 x 2048
  mask. Its ``softmax_max`` / ``softmax_sum`` outputs (B, N, Sq, 8: eight equal copies) give
  ``lse = max + log(sum)``.
- Backward: ``FlashAttentionScoreGrad`` fed ``softmax_max = lse`` and ``softmax_sum = 1``, so the
  kernel's exp(s - max) / sum is exp(s - lse): with the merged (global) lse and out this is this
  block's share of the ring's gradient, as the contract asks. The kernel derives
  delta = rowsum(dout * out) itself and has no input for a cotangent of ``lse``: ``dlse`` must be
  zero here (it is in the ring, whose result is ``out`` only).
- FlashAttentionScore takes float16/bfloat16 only: float32 inputs are cast to bfloat16 and the
  results cast back.
- The LSE merge has no ascend registration: dispatch uses the composite reference (elementwise).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from mindport import dispatch

_CELLS: dict = {}
_MASK: list = []


def available() -> bool:
    try:
        return dispatch.device_target() == "Ascend"
    except Exception:  # noqa: BLE001
        return False


def _causal_mask():
    if not _MASK:  # compressed mask for sparse modes 2-4: 1 = masked, strictly upper triangle
        _MASK.append(ops.triu(ops.ones((2048, 2048), ms.uint8), 1))
    return _MASK[0]


class _FlashBlock(nn.Cell):
    """One FlashAttentionScore block returning (out, lse), with the ring-compatible backward."""

    def __init__(self, head_num: int, scale: float, causal: bool):
        super().__init__()
        from mindspore.ops.auto_generate import FlashAttentionScore, FlashAttentionScoreGrad

        mode = 3 if causal else 0
        self.fa = FlashAttentionScore(head_num, scale_value=scale, input_layout="BNSD", sparse_mode=mode)
        self.fa_grad = FlashAttentionScoreGrad(head_num, scale_value=scale, input_layout="BNSD", sparse_mode=mode)
        self.mask = _causal_mask() if causal else None

    def construct(self, q, k, v):
        softmax_max, softmax_sum, _, out = self.fa(q, k, v, None, None, None, self.mask)
        return out, softmax_max[..., 0] + ops.log(softmax_sum[..., 0])

    def grad(self, q, k, v, out, lse, dout):
        smax = ops.broadcast_to(lse.expand_dims(-1), lse.shape + (8,))
        dq, dk, dv, _ = self.fa_grad(q, k, v, dout, None, None, None, self.mask, smax, ops.ones_like(smax), None,
                                     out)
        return dq, dk, dv

    def bprop(self, q, k, v, out, dout):
        return self.grad(q, k, v, out[0], out[1], dout[0])


@constexpr(reuse_result=False)
def _cell_key(head_num, scale, causal):
    # Runs in Python, also during jit compilation; a graph cannot create primitives, so the first
    # call for a (heads, scale, causal) must happen in PYNATIVE mode.
    key = (int(head_num), float(scale), bool(causal))
    if key not in _CELLS:
        _CELLS[key] = _FlashBlock(*key)
    return key


def _lowp(x):
    return x.astype(ms.bfloat16) if x.dtype == ms.float32 else x


@dispatch.register("ring_block_attention", "ascend", available=available)
def block_attention(q, k, v, scale: float, causal: bool):  # UNEXECUTED
    """FlashAttentionScore block. Same contract as the reference."""
    cell = _CELLS[_cell_key(q.shape[1], scale, causal)]
    out, lse = cell(_lowp(q), _lowp(k), _lowp(v))
    return out.astype(q.dtype), lse


@dispatch.register("ring_block_attention_grad", "ascend", available=available)
def block_attention_grad(q, k, v, out, lse, dout, dlse, scale: float, causal: bool):  # UNEXECUTED
    """FlashAttentionScoreGrad with softmax_max = lse, softmax_sum = 1 (``dlse`` must be zero)."""
    cell = _CELLS[_cell_key(q.shape[1], scale, causal)]
    dq, dk, dv = cell.grad(_lowp(q), _lowp(k), _lowp(v), _lowp(out), lse, _lowp(dout))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
