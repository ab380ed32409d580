"""Gradient synchronisation after the backward pass.

- Data parallel: gradients are SUMMED over the dp group in flat buckets (one all-reduce
  per bucket). The loss each rank differentiates is already divided by the global count
  of counted tokens (:class:`mindport.transformer.loss.CausalLMLoss`), so the sum is the
  single-process gradient, whatever labels are ignored on which rank.
- Context parallel: every cp rank holds all parameters and a share of the tokens; its
  gradients are summed over the cp group the same way.
- Expert parallel: an expert's weights live on the ranks of one expert-data-parallel group
  (``ep_dp``: same expert shard), so stacked expert weights are summed over ep_dp instead of dp.
- Tensor parallel: replicated parameters whose gradient is partial on each tp rank
  (``partial_over_tp`` in the slicing table: norms and row-parallel biases under sequence
  parallelism, the MoE router and shared-expert gate always) are summed over the tp group,
  before the data-parallel sum, so every tp rank holds the same gradient.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from mindport.parallel.comm import collectives
from mindport.parallel.sharding import rule_for
from mindport.parallel.state import ParallelGroups

DEFAULT_BUCKET_BYTES = 32 * 1024 * 1024


def buckets_by_size(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive index groups whose byte sizes add up to at most ``limit`` (one item may exceed it)."""
    out: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if out[-1] and total + size > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += size
    return [b for b in out if b]


class GradientSync(nn.Cell):
    """``grads -> grads`` summed over data- and context-parallel ranks (and over tp for the
    replicated parameters the slicing table marks ``partial_over_tp``)."""

    def __init__(self, params, groups: ParallelGroups, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__()
        self.tp = collectives(groups.tp)
        names = [p.name for p in params]
        self.tp_partial = [i for i, n in enumerate(names)
                           if groups.tp.size > 1 and rule_for(n).grad_partial_over_tp(groups.sequence_parallel)]
        self.shapes = [tuple(p.shape) for p in params]
        expert = [groups.ep.size > 1 and rule_for(n).kind == "expert" for n in names]
        # (collectives, buckets of parameter indices) per replica group
        self.plan = []
        for is_expert, data_group in ((False, groups.dp), (True, groups.ep_dp)):
            members = [i for i in range(len(names)) if expert[i] == is_expert]
            sizes = [int(params[i].size) * 4 for i in members]
            buckets = [[members[j] for j in b] for b in buckets_by_size(sizes, bucket_bytes)] if members else []
            for group in (data_group, groups.cp):
                if group.size > 1 and buckets:
                    self.plan.append((collectives(group), buckets))

    def construct(self, grads: tuple) -> tuple:
        grads = list(grads)
        for i in self.tp_partial:
            grads[i] = self.tp.all_reduce(grads[i])
        for replicas, buckets in self.plan:
            for bucket in buckets:
                flat = replicas.all_reduce(ops.cat([grads[i].reshape(-1) for i in bucket]))
                start = 0
                for i in bucket:
                    size = grads[i].size
                    grads[i] = flat[start:start + size].reshape(self.shapes[i])
                    start += size
        return tuple(grads)


def sum_of_squares(x: Tensor) -> Tensor:
    """Sum of x**2 over all elements, reduced along the last axis first: MindSpore's CPU ReduceSum
    over every axis of a 2-D tensor is about ten times slower than over its last axis."""
    squares = ops.square(x)
    return squares.reshape(-1, squares.shape[-1]).sum(-1).sum() if squares.ndim > 1 else squares.sum()


class GradNorm(nn.Cell):
    """L2 norm of the whole model's gradient from this rank's pieces of it.

    ``construct(squares)``: squares (n,) fp32, the sum of squares of this rank's piece of each
    parameter's synchronised gradient. The pieces are summed over every group that splits a
    parameter and nothing else: first over its ZeRO shard group (``shard_groups``, when the
    optimizer holds gradient slices), then expert weights over ep, tensor-parallel weights over
    tp (replicated ones count once: their gradients are complete and equal on every tp rank after
    :class:`GradientSync`), and the total over the pipeline stages. Data- and
    context-parallel replicas hold the same gradients and are not summed.
    """

    def __init__(self, names: list[str], groups: ParallelGroups, shard_groups: list | None = None):
        super().__init__()
        steps: list[tuple[list[bool], object]] = []
        for group in dict.fromkeys(shard_groups or []):
            if group.size > 1:
                steps.append(([g == group for g in shard_groups], group))
        if groups.ep.size > 1:
            steps.append(([rule_for(n).kind == "expert" for n in names], groups.ep))
        if groups.tp.size > 1:
            steps.append(([rule_for(n).tp_axis is not None for n in names], groups.tp))
        self.steps = [(Tensor(np.array(mask, np.float32)), collectives(group)) for mask, group in steps if any(mask)]
        self.pp = collectives(groups.pp) if groups.pp.size > 1 else None

    def construct(self, squares: Tensor) -> Tensor:
        for mask, comm in self.steps:
            squares = squares * (1.0 - mask) + comm.all_reduce(squares * mask)
        total = squares.sum()
        if self.pp is not None:
            total = self.pp.all_reduce(total)
        return ops.sqrt(total)
