"""One optimiser step: forward + backward per micro-batch, then sync, unscale, clip, update.

    N = sum over micro-batches and dp ranks of the supervised targets (labels != IGNORE_INDEX)
    for each of the A micro-batches (B, S):       loss_a = sum_t CE_t / N + router_loss_a / A
                                                  g_a = grad(scale * loss_a)
    g = sync(sum_a g_a)                           fp32; summed over dp/cp replicas (GradientSync)
    g /= scale ; n = ||g||_2                      the whole model's norm (GradNorm), before clipping;
                                                  non-finite n = overflow

so the loss is the mean over every supervised token of the global batch (token-weighted across
micro-batches and ranks, whatever each holds), and its gradient that of the whole batch at once.
Rows packing several sequences (``Batch.segment_ids``) get their block-diagonal mask and RoPE
tables per batch; unpacked rows share one cached per shape. Both are inputs of the compiled step.
    g *= min(1, clip / n)                         (the three scalings are one multiply)
    AdamW(masters, g, lr(step)) ; params <- masters (O2 only)

The layout comes from ``model.groups`` (``parallel_config``): tensor/sequence/expert parallel
layers live in the model; context parallelism feeds each rank its zigzag share of the sequence;
pipeline parallelism runs each accumulation step through the 1F1B schedule (micro_batch_num
micro-batches); ``optimizer_shard`` swaps AdamW for ZeRO-1 (:class:`ZeroAdamW`, which
reduce-scatters the gradients instead of all-reducing them). Without pipeline stages the step
compiles with ``ms.jit``, dense and MoE models alike (MoE shapes are static: ops/grouped_matmul);
pipeline stages run forward and backward eagerly (point-to-point exchanges between stages).
"""
from __future__ import annotations

from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from mindport.config import ConfigError
from mindport.constants import IGNORE_INDEX
from mindport.dispatch import check_dtype
from mindport.parallel.comm import collectives
from mindport.parallel.grad_sync import GradNorm, sum_of_squares
from mindport.train import amp as amp_lib
from mindport.train.config import TrainConfig
from mindport.train.data import Batch
from mindport.train.optim import AdamW, Optimizer, lr_at, no_decay_names


CONTEXT_PARALLEL_SEGMENTS = ("parallel_config: key 'context_parallel' > 1: data with segments.bin (packed or padded "
                             "sequences) is not supported under context parallelism (expected context_parallel: 1)")


def _identity(x):
    return x


def apply_recompute(model, recompute: bool | int) -> int:
    """Recompute the activations of the first N decoder layers in backward (True: all)."""
    layers = list(model.layers.values()) if hasattr(model.layers, "values") else list(model.layers)
    count = len(layers) if recompute is True else int(recompute or 0)
    for layer in layers[:count]:
        layer.recompute()
    return min(count, len(layers))


def next_token_targets(labels: np.ndarray) -> np.ndarray:
    """targets[:, t] = labels[:, t + 1]; the last position predicts nothing (ignored)."""
    targets = np.full(labels.shape, IGNORE_INDEX, np.int32)
    targets[:, :-1] = labels[:, 1:]
    return targets


def expert_load_metrics(load: np.ndarray) -> dict:
    """Per-layer metrics of this rank's step from the expert load (L, E + 1) (slots per expert, then
    dropped slots): ``expert_load`` (L x E routed slots), ``expert_load_imbalance`` (L: max / mean
    slots of an expert) and ``dropped_slots`` (L)."""
    tokens, dropped = load[:, :-1], load[:, -1]
    imbalance = tokens.max(1) / np.maximum(tokens.mean(1), 1e-9)
    return {"expert_load": np.rint(tokens).astype(int).tolist(),
            "expert_load_imbalance": [round(float(v), 4) for v in imbalance],
            "dropped_slots": np.rint(dropped).astype(int).tolist()}


class Trainer:
    """Holds the (possibly AMP-converted) model, the optimiser and the loss scaler.

    ``self.model`` is what trains (under O2 an fp16 copy of the model passed in);
    :meth:`fp32_weights` gives this rank's full-precision weights by parameter name.
    """

    def __init__(self, model, config: TrainConfig):
        self.config = config
        self.base_config = model.config
        self.groups = groups = model.groups
        groups.config.check_training(model.config)  # layouts the trainer cannot run fail before any work
        if model.quantization is not None:
            raise ConfigError(f"model: its weights are quantized ({model.quantization}) for inference only: train the "
                              f"model as loaded, without quantize_weights")
        self.level = config.amp_level
        self.masters: dict = {}
        if self.level != "O0":
            check_dtype(config.amp_dtype, "key 'runner_config.amp_dtype'")
        if self.level == "O2":
            model, self.masters = amp_lib.build_o2(model, config.amp_dtype)
        elif self.level == "O1":
            amp_lib.apply_o1(model, config.amp_dtype)
        self.model = model
        model.set_train(True)  # training-only behaviour (LoRA dropout) on
        self.recomputed_layers = apply_recompute(model, config.recompute)
        named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = ms.ParameterTuple([p for _, p in named])
        exempt = no_decay_names(model)
        decay = [n not in exempt for n in self.names]
        masters = [self.masters.get(n) for n in self.names]
        if groups.config.optimizer_shard and groups.dp.size > 1:  # ZeRO-1: reduce-scatters over dp itself
            from mindport.train.zero import ZeroAdamW

            self.optimizer: Optimizer = ZeroAdamW(list(self.params), groups, beta1=config.beta1, beta2=config.beta2,
                                                  eps=config.eps, weight_decay=config.weight_decay, decay=decay,
                                                  bias_correction=True, masters=masters)
        else:
            self.optimizer = AdamW(list(self.params), decay, config.beta1, config.beta2, config.eps,
                                   config.weight_decay, masters=masters, groups=groups)
        # the full fp32 copies the optimizer keeps (ZeRO keeps slices instead)
        self.masters = {n: m for n, m in zip(self.names, self.optimizer.full_masters) if m is not None}
        self.grad_norm = GradNorm(self.names, groups, self.optimizer.shard_groups)
        # the loss each rank computes is its share of the global mean (tokens of dp/cp ranks; only
        # the last pipeline stage has one): summed over those groups it is the global loss
        self.loss_sums = [collectives(g) for g in (groups.dp, groups.cp, groups.pp) if g.size > 1]
        self.count_sum = collectives(groups.dp) if groups.dp.size > 1 else None
        self.scaler = amp_lib.loss_scaler(config.loss_scale_type, config.loss_scale, config.loss_scale_factor,
                                          config.loss_scale_window)
        self.dynamic = config.loss_scale_type == "dynamic"
        self.step = 0  # completed optimiser steps
        self.pipeline = None
        if groups.pp.size > 1:
            from mindport.parallel.schedules import PipelineSchedule

            self.pipeline = PipelineSchedule(model, groups, groups.config.micro_batch_num)
        self.compiled = config.jit and self.pipeline is None
        self._build()
        self._inputs_cache: tuple | None = None

    @property
    def rows_per_step(self) -> int:
        """Rows of the global batch this data-parallel rank takes per accumulation step."""
        return self.config.batch_size * (self.groups.config.micro_batch_num if self.pipeline else 1)

    # ------------------------------------------------------------------ step functions
    def _build(self) -> None:
        model, scaler, clip, optimizer = self.model, self.scaler, float(self.config.grad_clip), self.optimizer

        def loss_fn(ids, cos, sin, mask, token_mask, targets, count, router_weight):
            logits, router_loss, load = model.forward(ids, cos, sin, mask, token_mask=token_mask)
            loss = model.loss_from_targets(logits, router_loss, targets, count, router_weight)
            return loss * scaler.scale_value.astype(loss.dtype), loss, load

        grad_fn = ms.value_and_grad(loss_fn, None, self.params, has_aux=True)

        def micro(ids, cos, sin, mask, token_mask, targets, count, router_weight):
            (_, loss, load), grads = grad_fn(ids, cos, sin, mask, token_mask, targets, count, router_weight)
            return loss, tuple(g.astype(ms.float32) for g in grads), load

        def accumulate(acc, grads):
            return tuple(a + g.astype(ms.float32) for a, g in zip(acc, grads))

        def apply(grads, lr):
            # grads = sum over micro-batches of d(scale * loss_a); one multiply turns them into the
            # clipped gradient of the mean: coef = 1 / scale, times the clip factor
            pieces = optimizer.reduce_grads(grads)  # summed over the replicas (ZeRO: this rank's slices)
            coef = 1.0 / scaler.scale_value
            norm = self.grad_norm(ops.stack([sum_of_squares(g) for g in pieces])) * coef
            finite = ops.isfinite(norm)  # an inf/nan anywhere makes the norm non-finite
            if clip > 0:
                coef = coef * (clip / ops.maximum(norm, clip))
            pieces = tuple(g * coef for g in pieces)
            if self.dynamic:
                scaler.adjust(finite)
                if finite:
                    optimizer.update(pieces, lr)
            else:
                optimizer.update(pieces, lr)
            return norm, finite

        def fused(ids, cos, sin, mask, token_mask, targets, count, router_weight, lr):
            loss, grads, load = micro(ids, cos, sin, mask, token_mask, targets, count, router_weight)
            norm, finite = apply(grads, lr)
            return loss, norm, finite, load

        wrap = ms.jit if self.compiled else _identity
        self._micro, self._accumulate, self._fused = wrap(micro), wrap(accumulate), wrap(fused)
        self._apply = ms.jit(apply) if self.config.jit else apply

    def _inputs(self, batch: Batch):
        """Model inputs and next-token targets of one micro-batch (this rank's zigzag share under
        context parallelism): (ids, cos, sin, mask, token_mask, targets); token_mask (B, S) marks the
        padding of rows with segments (None without: nothing is padding)."""
        ids = np.ascontiguousarray(batch.input_ids, dtype=np.int32)
        cp = self.groups.cp
        if cp.size > 1:
            from mindport.parallel.context import context_parallel_batch

            if batch.segment_ids is not None:
                raise ConfigError(CONTEXT_PARALLEL_SEGMENTS)
            share = context_parallel_batch(ids, cp.size, cp.rank, batch.labels)
            local, targets, prepare = share.ids, share.targets, lambda: share.model_inputs(self.model)
        else:
            local, targets, prepare = ids, next_token_targets(batch.labels), \
                lambda: self.model.prepare(ids, segment_ids=batch.segment_ids)
        if batch.segment_ids is not None or self._inputs_cache is None or self._inputs_cache[0] != ids.shape:
            _, cos, sin, mask, q_scale = prepare()  # packed rows: a mask and tables of their own
            if q_scale is not None:
                raise ConfigError("key 'use_logn_attn' = True: training with logN query scaling is not supported "
                                  "(it applies beyond training_seqlen, at inference)")
            self._inputs_cache = (None if batch.segment_ids is not None else ids.shape, cos, sin, mask)
        _, cos, sin, mask = self._inputs_cache
        token_mask = self.model.token_mask(segment_ids=batch.segment_ids)
        return Tensor(np.ascontiguousarray(local, dtype=np.int32)), cos, sin, mask, token_mask, \
            Tensor(targets, ms.int32)

    def supervised_count(self, micro_batches: Sequence[Batch]) -> Tensor:
        """N: the supervised targets of the whole step, over the micro-batches and data-parallel ranks
        (every context-parallel rank holds whole rows, so counts them all)."""
        local = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        count = Tensor(float(local), ms.float32)
        return self.count_sum.all_reduce(count) if self.count_sum else count

    def lr(self, step: int | None = None) -> float:
        c = self.config
        return lr_at(self.step if step is None else step, c.learning_rate, c.min_learning_rate, c.warmup_steps,
                     c.train_steps)

    def train_step(self, micro_batches: Sequence[Batch]) -> dict:
        """One optimiser step over ``micro_batches`` (each ``rows_per_step`` rows of this data-parallel
        rank); returns its metrics (loss over the whole global batch)."""
        lr_value = self.lr()
        lr = Tensor(lr_value, ms.float32)
        count = self.supervised_count(micro_batches)
        router_weight = Tensor(1.0 / len(micro_batches), ms.float32)
        load = None  # (L, E + 1) expert load summed over the micro-batches (MoE, without pipeline stages)
        if self.pipeline is None and len(micro_batches) == 1:
            loss, norm, finite, load = self._fused(*self._inputs(micro_batches[0]), count, router_weight, lr)
        else:
            losses, acc = [], None
            for batch in micro_batches:
                if self.pipeline is None:
                    loss, grads, micro_load = self._micro(*self._inputs(batch), count, router_weight)
                    load = micro_load if load is None else load + micro_load
                else:
                    loss, grads = self.pipeline.run(batch, self.scaler.scale_value, count, router_weight)
                    loss = ops.zeros((), ms.float32) if loss is None else loss
                losses.append(loss)
                grads = ms.mutable(tuple(grads))  # variables, not constants, of the compiled functions
                acc = grads if acc is None else ms.mutable(self._accumulate(acc, grads))
            norm, finite = self._apply(acc, lr)
            loss = ops.stack(losses).sum()
        for comm in self.loss_sums:
            loss = comm.all_reduce(loss)
        self.step += 1
        metrics = {"step": self.step, "loss": float(loss.asnumpy()), "lr": lr_value,
                   "grad_norm": float(norm.asnumpy()), "loss_scale": float(self.scaler.scale_value.asnumpy()),
                   "finite": bool(finite.asnumpy())}
        if self.base_config.num_experts and load is not None:
            metrics.update(expert_load_metrics(load.asnumpy()))  # one (L, E + 1) read per step
        return metrics

    # ------------------------------------------------------------------ state
    def fp32_weights(self) -> dict[str, np.ndarray]:
        """Model parameter name -> fp32 array of this rank (the master copy under O2; gathered from
        the data-parallel ranks' slices under ZeRO + O2, a collective)."""
        return {n: w.asnumpy() for n, w in zip(self.names, self.optimizer.master_weights())}

    def load_fp32_weights(self, weights: dict[str, np.ndarray], source: str) -> None:
        from mindport.checkpoint.tensor_check import check_tensors

        check_tensors({n: np.shape(weights[n]) for n in self.names if n in weights},
                      {n: tuple(p.shape) for n, p in zip(self.names, self.params)}, source, "the model has")
        self.optimizer.load_weights([np.asarray(weights[n], dtype=np.float32) for n in self.names])

    def state_tensors(self) -> dict:
        """Optimiser and loss-scale state: name -> Parameter (moments keyed by model parameter name,
        so O1 and O2 checkpoints resume into each other)."""
        out = self.optimizer.state_tensors(self.names)
        out["loss_scale.value"] = self.scaler.scale_value
        if self.dynamic:
            out["loss_scale.counter"] = self.scaler.counter
        return out
