"""Reference backend of the skinny matmul: MindSpore's MatMul, the ground truth (any M, any dtype)."""
from __future__ import annotations

from mindspore import ops

from mindport import dispatch

_MATMUL_NT = ops.MatMul(transpose_b=True)


@dispatch.register("skinny_matmul", "reference")
def skinny_matmul(x, weight):
    """y (M, N) = x (M, K) @ weight (N, K)^T."""
    return _MATMUL_NT(x, weight)
