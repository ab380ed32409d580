"""Pipeline-parallel 1F1B schedule (warm-up, steady state, cool-down).

Stage s of P runs M micro-batches: W = min(P - s - 1, M) warm-up forwards, then M - W
steady steps of one forward and one backward, then W cool-down backwards. Activations go
to the next stage and their gradients come back point-to-point. Every message between two
neighbouring stages is one *exchange* carrying a forward slot (activation, lower -> upper)
and a backward slot (gradient, upper -> lower); both neighbours issue the same sequence
F^W (FB)^(M-W) B^W of exchanges, so the transfers pair up with blocking communication.
On CPU an exchange is an AllReduce(SUM) over the 2-rank pair group (each side contributes
zeros in the slot it does not send); on Ascend/GPU the same pairing maps onto send/recv.

MindSpore's PYNATIVE mode keeps one pending backward graph at a time, so a micro-batch's
backward step recomputes its forward under ``mindspore.vjp`` from the saved stage input
(full activation recomputation): a stage keeps at most P - s inputs in flight, and each
micro-batch's forward runs twice.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from mindport.constants import IGNORE_INDEX
from mindport.dtypes import dtype_of
from mindport.parallel.comm import collectives
from mindport.parallel.state import ParallelGroups


class _Link:
    """Exchanges with one neighbouring stage (absent at the ends of the pipeline)."""

    def __init__(self, group, lower: bool):
        self.comm = collectives(group) if group.size > 1 else None
        self.lower = lower  # this rank is the lower stage of the pair

    def exchange(self, forward: Tensor | None, backward: Tensor | None, shape, dtype) -> tuple[Tensor, Tensor]:
        fwd = forward if forward is not None else ops.zeros(shape, dtype)
        bwd = backward if backward is not None else ops.zeros(shape, dtype)
        both = self.comm.all_reduce(ops.stack([fwd.astype(dtype), bwd.astype(dtype)]))
        return both[0], both[1]


class PipelineSchedule:
    """Runs one optimizer step's forward and backward passes over ``micro_batches`` on this stage."""

    def __init__(self, model, groups: ParallelGroups, micro_batches: int):
        self.model, self.groups, self.micro_batches = model, groups, micro_batches
        self.stage, self.stages = groups.pp.rank, groups.pp.size
        self.prev = _Link(groups.pp_prev, lower=False)
        self.next = _Link(groups.pp_next, lower=True)
        self.params = model.trainable_params()
        from mindport.parallel.comm import ReduceFromGroup

        self.count_over = [ReduceFromGroup(g) for g in (groups.dp, groups.cp)]

    def _activation_shape(self, batch: int, seq: int) -> tuple[int, int, int]:
        cfg = self.model.config
        shard = self.groups.tp.size if self.groups.sequence_parallel else 1
        return (batch, seq // shard, cfg.hidden_size)

    def run(self, batch, loss_scale: Tensor | float = 1.0, count: Tensor | None = None,
            router_weight: Tensor | float = 1.0) -> tuple[Tensor | None, tuple]:
        """(loss on the last stage else None, fp32 sums of the gradients of this stage's parameters
        of ``loss_scale`` times the loss).

        ``batch``: a :class:`mindport.train.data.Batch`, (B, S) arrays; every stage receives it (RoPE
        tables and masks come from the shapes and segment ids; only the first stage reads the ids,
        only the last the labels). The loss is the sum over the supervised tokens divided by
        ``count`` (default: those of this batch over the data- and context-parallel ranks), plus
        ``router_weight`` times the router loss.
        """
        model, m = self.model, self.micro_batches
        input_ids, labels, segments = batch.input_ids, batch.labels, batch.segment_ids
        b, s = input_ids.shape
        if b % m:
            raise ValueError(f"batch size {b}: expected a multiple of micro_batch_num = {m}")
        mb = b // m
        dtype = dtype_of(model.config.compute_dtype)  # of the activations exchanged between stages
        shape = self._activation_shape(mb, s)
        if count is None:
            count = Tensor(float((labels[:, 1:] != IGNORE_INDEX).sum()), ms.float32)
            for reduce in self.count_over:
                count = reduce(count)
        grads = [ops.zeros(p.shape, ms.float32) for p in self.params]  # summed in fp32 whatever the weights
        scale = Tensor(loss_scale, ms.float32) if not isinstance(loss_scale, Tensor) else loss_scale.astype(ms.float32)
        pending: list = []  # (stage function, input) of micro-batches whose backward has not run
        losses = []

        def forward(k: int, x: Tensor | None):
            rows = slice(k * mb, (k + 1) * mb)
            ids_t, cos, sin, mask, q_scale = model.prepare(
                input_ids[rows], segment_ids=None if segments is None else segments[rows])
            targets = Tensor(labels[rows][:, 1:], ms.int32)
            token_mask = None if segments is None else model.token_mask(segment_ids=segments[rows])

            def stage(x_in):
                out, router_loss, _ = model.forward(ids_t if model.is_first else x_in, cos, sin, mask, q_scale,
                                                    token_mask=token_mask)
                if model.is_last:
                    return model.loss_from_targets(out[:, :-1], router_loss, targets, count, router_weight / m)
                return out

            x_in = x if x is not None else cos  # the first stage differentiates w.r.t. weights only
            out = stage(x_in)
            pending.append((stage, x_in))
            if model.is_last:
                losses.append(out)
            return out

        def backward(dy: Tensor | None) -> Tensor:
            stage, x_in = pending.pop(0)
            _, vjp_fn = ms.vjp(stage, x_in, weights=self.params)
            cot = dy if dy is not None else scale
            (dx,), dparams = vjp_fn(cot)
            for i, g in enumerate(dparams):
                grads[i] = grads[i] + g.astype(ms.float32)
            return dx

        first, last = self.stage == 0, self.stage == self.stages - 1
        warmup = min(self.stages - self.stage - 1, m)

        def recv_forward():
            return None if first else self.prev.exchange(None, None, shape, dtype)[0]

        for k in range(warmup):
            y = forward(k, recv_forward())
            self.next.exchange(y, None, shape, dtype)
        x = recv_forward() if m > warmup else None
        for k in range(warmup, m):
            y = forward(k, x)
            dy = None if last else self.next.exchange(y, None, shape, dtype)[1]
            dx = backward(dy)
            if first:
                x = None
            elif k < m - 1:
                x = self.prev.exchange(None, dx, shape, dtype)[0]
            else:
                self.prev.exchange(None, dx, shape, dtype)
        for _ in range(warmup):
            dy = self.next.exchange(None, None, shape, dtype)[1]
            dx = backward(dy)
            if not first:
                self.prev.exchange(None, dx, shape, dtype)
        loss = sum(losses[1:], losses[0]) if losses else None
        return loss, tuple(grads)
