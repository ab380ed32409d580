"""Collectives with an explicit group, each paired with its backward dual.

Two backends share one interface (:class:`Collectives`):

- ``NativeCollectives``: MindSpore's communication primitives (HCCL on Ascend, NCCL on
  GPU). UNEXECUTED: no Ascend NPU or MindSpore-capable GPU was available.
- ``EmulatedCollectives``: every collective built from sub-group AllReduce(SUM), the one
  collective MindSpore supports on CPU sub-groups. Exact (zeros are added), slower.
  all-gather = place your block in zeros and sum; reduce-scatter = sum and keep your
  block; all-to-all and ring shift = all-gather and pick; broadcast = the root sums alone.

The differentiable Cells below are Megatron's mappings (identity <-> all-reduce,
all-gather <-> reduce-scatter, split <-> all-gather, all-to-all <-> inverse all-to-all),
and a group of size 1 makes each of them the identity.

Shapes: ``axis`` is the axis that is split across, or concatenated over, the group.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindport.parallel.state import Group


def _chunk(x: Tensor, axis: int, parts: int, index: int) -> Tensor:
    size = x.shape[axis] // parts
    return ops.narrow(x, axis, index * size, size)


class EmulatedCollectives:
    """Collectives over ``group`` from AllReduce(SUM) only (what CPU sub-groups support)."""

    def __init__(self, group: Group):
        self.group = group
        self.reduce = ops.AllReduce(group=group.name) if group.size > 1 else None

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.reduce is None:
            return x
        if x.dtype in (ms.int32, ms.int64):  # CPU AllReduce takes floats: counts are exact below 2**24
            return self.reduce(x.astype(ms.float32)).astype(x.dtype)
        return self.reduce(x)

    def all_gather(self, x: Tensor, axis: int) -> Tensor:
        n, r = self.group.size, self.group.rank
        if n == 1:
            return x
        axis = axis % x.ndim
        parts = []
        if r > 0:
            parts.append(ops.zeros(x.shape[:axis] + (r * x.shape[axis],) + x.shape[axis + 1:], x.dtype))
        parts.append(x)
        if r < n - 1:
            parts.append(ops.zeros(x.shape[:axis] + ((n - 1 - r) * x.shape[axis],) + x.shape[axis + 1:], x.dtype))
        return self.all_reduce(ops.cat(parts, axis))

    def reduce_scatter(self, x: Tensor, axis: int) -> Tensor:
        if self.group.size == 1:
            return x
        return _chunk(self.all_reduce(x), axis, self.group.size, self.group.rank)

    def all_to_all(self, x: Tensor, split_axis: int, concat_axis: int) -> Tensor:
        """Rank j receives chunk j (along split_axis) of every rank, concatenated in rank order."""
        n, r = self.group.size, self.group.rank
        if n == 1:
            return x
        everyone = self.all_gather(ops.expand_dims(x, 0), 0)  # (n, ...)
        pieces = [_chunk(everyone[i], split_axis, n, r) for i in range(n)]
        return ops.cat(pieces, concat_axis)

    def shift(self, x: Tensor, offset: int) -> Tensor:
        """The tensor held by the rank ``offset`` places before this one (ring order)."""
        n = self.group.size
        if n == 1:
            return x
        everyone = self.all_gather(ops.expand_dims(x, 0), 0)
        return everyone[(self.group.rank - offset) % n]

    def broadcast(self, x: Tensor, root: int) -> Tensor:
        if self.group.size == 1:
            return x
        # x * 0, not zeros_like: the graph compiler may merge constant-zero collectives on some ranks only
        return self.all_reduce(x if self.group.rank == root else x * 0)


class NativeCollectives(EmulatedCollectives):
    """Device collectives (HCCL/NCCL). UNEXECUTED: written from the API documentation."""

    def __init__(self, group: Group):
        super().__init__(group)
        if group.size > 1:
            self.gather = ops.AllGather(group=group.name)
            self.scatter = ops.ReduceScatter(group=group.name)

    def all_gather(self, x: Tensor, axis: int) -> Tensor:
        if self.group.size == 1:
            return x
        return ops.moveaxis(self.gather(ops.moveaxis(x, axis, 0)), 0, axis)

    def reduce_scatter(self, x: Tensor, axis: int) -> Tensor:
        if self.group.size == 1:
            return x
        return ops.moveaxis(self.scatter(ops.moveaxis(x, axis, 0)), 0, axis)

    def all_to_all(self, x: Tensor, split_axis: int, concat_axis: int) -> Tensor:
        if self.group.size == 1:
            return x
        op = ops.AlltoAll(self.group.size, split_axis, concat_axis, group=self.group.name)
        return op(x)


def collectives(group: Group) -> EmulatedCollectives:
    """The backend for this device: emulated on CPU, native elsewhere."""
    return EmulatedCollectives(group) if ms.get_context("device_target") == "CPU" else NativeCollectives(group)


class _Mapping(nn.Cell):
    def __init__(self, group: Group):
        super().__init__()
        self.comm = collectives(group)


class CopyToGroup(_Mapping):
    """Forward identity, backward all-reduce (enter a tensor-parallel region)."""

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.comm.all_reduce(dout),)


class ShareGradient(_Mapping):
    """Forward identity, backward ``dout / group size``: a term computed identically on every
    rank of the group whose gradient is summed over the group later (the MoE router loss under
    tensor parallelism), so that the sum counts it once."""

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (dout / self.comm.group.size,)


class ReduceFromGroup(_Mapping):
    """Forward all-reduce, backward identity (leave a tensor-parallel region)."""

    def construct(self, x):
        return self.comm.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class GatherFromGroup(_Mapping):
    """Forward all-gather along ``axis``, backward reduce-scatter (sequence parallel: enter)."""

    def __init__(self, group: Group, axis: int):
        super().__init__(group)
        self.axis = axis

    def construct(self, x):
        return self.comm.all_gather(x, self.axis)

    def bprop(self, x, out, dout):
        return (self.comm.reduce_scatter(dout, self.axis),)


class ReduceScatterToGroup(_Mapping):
    """Forward reduce-scatter along ``axis``, backward all-gather (sequence parallel: leave)."""

    def __init__(self, group: Group, axis: int):
        super().__init__(group)
        self.axis = axis

    def construct(self, x):
        return self.comm.reduce_scatter(x, self.axis)

    def bprop(self, x, out, dout):
        return (self.comm.all_gather(dout, self.axis),)


class ScatterToGroup(_Mapping):
    """Forward: keep this rank's block along ``axis``; backward all-gather."""

    def __init__(self, group: Group, axis: int):
        super().__init__(group)
        self.axis, self.size, self.rank = axis, group.size, group.rank

    def construct(self, x):
        return _chunk(x, self.axis, self.size, self.rank) if self.size > 1 else x

    def bprop(self, x, out, dout):
        return (self.comm.all_gather(dout, self.axis),)


class GatherToAll(_Mapping):
    """Forward all-gather along ``axis``, backward: keep this rank's block of the gradient."""

    def __init__(self, group: Group, axis: int):
        super().__init__(group)
        self.axis, self.size, self.rank = axis, group.size, group.rank

    def construct(self, x):
        return self.comm.all_gather(x, self.axis)

    def bprop(self, x, out, dout):
        return (_chunk(dout, self.axis, self.size, self.rank) if self.size > 1 else dout,)


class AllToAll(_Mapping):
    """Forward all-to-all (split ``split_axis``, concatenate ``concat_axis``); backward the inverse."""

    def __init__(self, group: Group, split_axis: int, concat_axis: int):
        super().__init__(group)
        self.split_axis, self.concat_axis = split_axis, concat_axis

    def construct(self, x):
        return self.comm.all_to_all(x, self.split_axis, self.concat_axis)

    def bprop(self, x, out, dout):
        return (self.comm.all_to_all(dout, self.concat_axis, self.split_axis),)


class RingShift(_Mapping):
    """Forward: receive the tensor of the rank ``offset`` places before; backward: the reverse shift."""

    def __init__(self, group: Group, offset: int = 1):
        super().__init__(group)
        self.offset = offset

    def construct(self, x):
        return self.comm.shift(x, self.offset)

    def bprop(self, x, out, dout):
        return (self.comm.shift(dout, -self.offset),)
