"""CPU backend of the skinny matmul: a C++ streaming dot-product loop through ``ops.Custom(func_type="aot")``.

The kernel lives in ``csrc/skinny_matmul.cc`` and is built on first use by :mod:`mindport.ops._aot`
(cached, atomic, falling back to the reference if the build fails). The kernel takes float32 x of
1 <= M <= ``MAX_ROWS`` rows, but the backend hands it only ``FASTER_ROWS``: on the 2-core build
machine (quiet, BENCHMARKS.md) it beat MatMul at M = 1 (decode step 15.6 vs 17.3 ms with its first,
one-thread, two-row loop) and lost at M = 8 (55.5 vs 46.9 ms: one row at a time is compute-bound
there, MatMul's tiles are not). Other inputs go to the reference. The backward is two MatMuls
(dx = dy weight, dweight = dy^T x).
"""
from __future__ import annotations

import os

import mindspore as ms
from mindspore import ops

from mindport import dispatch
from mindport.ops._aot import CustomKernels, require

from . import reference

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "skinny_matmul.cc")
MAX_ROWS = 8  # kMaxRows of the kernel
FASTER_ROWS = 1  # the row counts at which it beats MatMul (measured up to here; M = 8 is slower)

_MATMUL = ops.MatMul()
_MATMUL_TA = ops.MatMul(transpose_a=True)


def _make_prims(lib: str) -> dict:
    def bprop(x, weight, out, dout):
        return _MATMUL(dout, weight), _MATMUL_TA(dout, x)

    forward = ops.Custom(f"{lib}:SkinnyMatmul", out_shape=lambda x, w: [x[0], w[0]], out_dtype=lambda x, w: x,
                         func_type="aot", bprop=bprop)
    return {"forward": forward}


KERNELS = CustomKernels("skinny_matmul", SOURCE, _make_prims)


def available() -> bool:
    """True when the C++ library is built (building it on first call) and the primitive exists."""
    return KERNELS.available()


@dispatch.register("skinny_matmul", "cpu", available=available)
def skinny_matmul(x, weight):
    """y (M, N) = x (M, K) @ weight (N, K)^T: C++ for float32 and 1 <= M <= FASTER_ROWS, else the reference."""
    if not 1 <= x.shape[0] <= FASTER_ROWS or x.dtype != ms.float32 or weight.dtype != ms.float32:
        return reference.skinny_matmul(x, weight)
    require(__name__, "skinny_matmul")
    return KERNELS["forward"](x, weight)
