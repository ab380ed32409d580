"""Ascend backend of the grouped expert matmul, on CANN's ``GroupedMatmul``.

UNEXECUTED: no Ascend NPU was available; written from the MindSpore 2.10 docstring of
``ops.auto_generate.GroupedMatmul`` (split_item 3, group_type 0: one 2-D x grouped on its rows,
one 3-D weight, int64 ``group_list`` of cumulative row ends whose last entry must equal N; the
documented backward exists for exactly this mode). Rows past the groups (dropped slots) are given
to the last expert so that the ends reach N, then zeroed. Expect to fix details on first contact
with hardware.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops
from mindspore.ops import constexpr

from mindport import dispatch

from .reference import group_of_rows

_PRIMS: dict = {}


def available() -> bool:
    try:
        return dispatch.device_target() == "Ascend"
    except Exception:  # noqa: BLE001
        return False


@constexpr(reuse_result=False)
def _require_prim():
    # A graph cannot create primitives: the first call happens in PYNATIVE mode or at import on Ascend.
    if not _PRIMS:
        from mindspore.ops.auto_generate import GroupedMatmul

        _PRIMS["gmm"] = GroupedMatmul(split_item=3, group_type=0, transpose_a=False, transpose_b=True)
    return True


if available():
    _require_prim()


@dispatch.register("grouped_matmul", "ascend", available=available)
def grouped_matmul(x, weight, group_sizes):
    """CANN GroupedMatmul over expert-grouped rows. Same contract as the reference."""
    _require_prim()
    n, e = x.shape[0], weight.shape[0]
    ends = ops.cumsum(ops.maximum(group_sizes, 0), 0).astype(ms.int64)
    ends = ops.minimum(ends, ms.Tensor(n, ms.int64))
    ends = ops.concat([ends[:e - 1], ops.full((1,), n, dtype=ms.int64)])  # the tail rows join the last expert
    y = _PRIMS["gmm"]([x], [weight], None, None, None, None, None, ends)[0]
    kept = (group_of_rows(group_sizes, n) < e).reshape(n, 1)
    return ops.where(kept, y, ops.zeros((), y.dtype))
