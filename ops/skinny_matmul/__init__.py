"""Matmul of a few rows by a Linear weight: the decode-time product of every projection.

Notation: M rows (the decoding batch), K input width, N output width.

``skinny_matmul(x[M,K], weight[N,K]) -> y[M,N] = x @ weight^T`` (``weight`` in the Linear
layout (out, in)), any M and dtype, differentiable wrt both; every
:class:`mindport.parallel.layers.Linear` projects through it. While decoding, M is the batch and
the product is bound by reading the weight once: MindSpore's CPU MatMul reads it at less than half
the rate of a streaming dot-product loop (BENCHMARKS.md, decoding speed).

Backends (chosen by :mod:`mindport.dispatch`): ``reference`` (``MatMul(transpose_b=True)``, the
ground truth, and the choice on Ascend), ``cpu`` (the C++ loop via ``ops.Custom`` for float32 x of
M <= ``cpu.FASTER_ROWS`` rows, where it beats MatMul, the reference otherwise: the static shape decides
while a graph compiles).
"""
from __future__ import annotations

from mindspore.ops import constexpr

from mindport import dispatch

from . import reference  # registers the "reference" backend
from . import cpu  # registers the "cpu" backend

SKINNY_MATMUL = "skinny_matmul"

# The table dispatch holds, spelled out so that a jit graph can index it with a constant.
_IMPLS = {"reference": reference.skinny_matmul, "cpu": cpu.skinny_matmul}


@constexpr(reuse_result=False)
def _backend(op):
    return dispatch.choose(op)  # plain Python: as a constexpr it also runs while a graph compiles


def skinny_matmul(x, weight):
    """y (M, N) = x (M, K) @ weight (N, K)^T on this device's backend; see the module docstring."""
    return _IMPLS[_backend(SKINNY_MATMUL)](x, weight)


__all__ = ["skinny_matmul", "SKINNY_MATMUL"]
