"""Grouped expert matmul: the experts' matmuls over expert-grouped rows, with static shapes.

Notation: N rows (routing slots), K input width, F output width, E experts.

``grouped_matmul(x[N,K], weight[E,F,K], group_sizes i32[E]) -> y[N,F]``
    Rows are grouped by expert: rows [o_e, o_e + n_e) with o_e = n_0 + ... + n_{e-1} belong to
    expert e and y there is x @ weight[e]^T (``weight`` in the Linear layout (out, in), the layout of
    :class:`mindport.transformer.moe.Experts`). Rows from sum(n_e) on (dropped slots, or rows
    another rank's experts own) give zero rows. ``group_sizes`` is a device tensor: N rows in, N
    rows out, nothing read on the host, so the op compiles inside ``mindspore.jit``.
    Differentiable wrt x and weight (an empty expert gets a zero weight gradient).

Backends (chosen by :mod:`mindport.dispatch`): ``reference`` (composite: one masked matmul per
expert, E times the FLOPs; the ground truth), ``cpu`` (C++ GEMM via ``ops.Custom``, forward and
backward, float32; AVX-512, else AVX2 + FMA, else plain vectors: ``cpu.force_isa`` picks a narrower
one, for tests), ``ascend`` (CANN ``GroupedMatmul``; UNEXECUTED).
"""
from __future__ import annotations

from mindspore.ops import constexpr

from mindport import dispatch

from . import reference  # registers the "reference" backend
from . import cpu  # registers the "cpu" backend
from . import ascend  # registers the "ascend" backend

from .reference import group_of_rows  # the expert of every row, from the group sizes (composite ops)

GROUPED_MATMUL = "grouped_matmul"

# The table dispatch holds, spelled out so that a jit graph can index it with a constant.
_IMPLS = {"reference": reference.grouped_matmul, "cpu": cpu.grouped_matmul, "ascend": ascend.grouped_matmul}


@constexpr(reuse_result=False)
def _backend(op):
    return dispatch.choose(op)  # plain Python: as a constexpr it also runs while a graph compiles


def grouped_matmul(x, weight, group_sizes):
    """y (N, F) of x (N, K) grouped by expert; see the module docstring."""
    return _IMPLS[_backend(GROUPED_MATMUL)](x, weight, group_sizes)


__all__ = ["grouped_matmul", "group_of_rows", "GROUPED_MATMUL"]
