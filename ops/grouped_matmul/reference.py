"""Reference backend of the grouped expert matmul: composite MindSpore ops, the ground truth.

Each row's expert comes from the cumulative group sizes (no host read); y is the sum over experts
of x @ weight[e]^T masked to that expert's rows. E times the FLOPs of the grouped product, but
static shapes only, so it runs in PYNATIVE mode and inside ``mindspore.jit``; gradients come from
automatic differentiation.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mindport import dispatch


def group_of_rows(group_sizes, num_rows: int):
    """Expert of every row (N,) int32: E for rows past the last group (sizes below 0 count as 0)."""
    ends = ops.cumsum(ops.maximum(group_sizes, 0), 0).astype(ms.int32)  # (E,)
    rows = ops.arange(num_rows, dtype=ms.int32).reshape(num_rows, 1)
    return (rows >= ends.reshape(1, -1)).astype(ms.int32).sum(1).astype(ms.int32)


@dispatch.register("grouped_matmul", "reference")
def grouped_matmul(x, weight, group_sizes):
    """y (N, F) = x (N, K) @ weight[e]^T on each expert e's rows, zero past the groups."""
    n = x.shape[0]
    expert = group_of_rows(group_sizes, n).reshape(n, 1)
    y = ops.zeros((n, weight.shape[1]), x.dtype)
    for e in range(weight.shape[0]):
        y = y + ops.where(expert == e, ops.matmul(x, weight[e].T), ops.zeros((), x.dtype))
    return y
