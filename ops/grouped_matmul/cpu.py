"""CPU backend of the grouped expert matmul: a C++ GEMM through ``ops.Custom(func_type="aot")``.

The kernels live in ``csrc/grouped_matmul.cc`` and are built on first use by
:mod:`mindport.ops._aot` (cached, atomic, falling back to the reference if the build fails).
Forward and backward (dX and every expert's dW in one call) are C++; they compute in float32, so
other dtypes are cast around them. They use the widest instruction set the processor has
(AVX-512, else AVX2 + FMA, else plain vectors); :func:`force_isa` picks a narrower one (tests).
"""
from __future__ import annotations

import ctypes
import os

import mindspore as ms
from mindspore import ops

from mindport import dispatch
from mindport.ops._aot import CustomKernels, require

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "grouped_matmul.cc")
ISAS = ("generic", "avx2", "avx512")  # the kernel's instruction sets, narrowest first (its enum Isa)


def _make_prims(lib: str) -> dict:
    backward = ops.Custom(f"{lib}:GroupedMatmulBackward", out_shape=lambda dy, x, w, sizes: (x, w),
                          out_dtype=lambda dy, x, w, sizes: (x, w), func_type="aot")

    def bprop(x, weight, group_sizes, out, dout):
        dx, dw = backward(dout, x, weight, group_sizes)
        return dx, dw, ops.zeros_like(group_sizes)

    forward = ops.Custom(f"{lib}:GroupedMatmul", out_shape=lambda x, w, sizes: [x[0], w[1]],
                         out_dtype=lambda x, w, sizes: x, func_type="aot", bprop=bprop)
    return {"forward": forward}


KERNELS = CustomKernels("grouped_matmul", SOURCE, _make_prims)


def available() -> bool:
    """True when the C++ library is built (building it on first call) and the primitive exists."""
    return KERNELS.available()


def force_isa(isa: str | None) -> bool:
    """Run the kernels with instruction set ``isa`` (one of ``ISAS``; None: the best the processor
    has) from now on, in this process. False, and nothing changed, if the processor lacks it."""
    if isa is not None and isa not in ISAS:
        raise ValueError(f"grouped_matmul: isa {isa!r}: expected one of {', '.join(ISAS)} or None")
    require(__name__, "grouped_matmul")
    library = ctypes.CDLL(KERNELS.library.lib)  # the library MindSpore loaded: dlopen returns the same handle
    return library.GroupedMatmulForceIsa(-1 if isa is None else ISAS.index(isa)) == 0


@dispatch.register("grouped_matmul", "cpu", available=available)
def grouped_matmul(x, weight, group_sizes):
    """Grouped expert matmul (C++, float32). Same contract as the reference."""
    require(__name__, "grouped_matmul")
    y = KERNELS["forward"](x.astype(ms.float32), weight.astype(ms.float32), group_sizes.astype(ms.int32))
    return y.astype(x.dtype)
