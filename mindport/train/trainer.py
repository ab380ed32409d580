"""One optimiser step: forward + backward per micro-batch, then unscale, sync, clip, update.

    for each of the A micro-batches (B, S):       loss_a, g_a = grad(scale * loss(model(x_a)))
    g = grad_sync(sum_a g_a)                      fp32; data-parallel all-reduce (injected; identity here)
    g /= A * scale ; n = ||g||_2                  norm reported before clipping; non-finite n = overflow
    g *= min(1, clip / n)                         (the three scalings are one multiply)
    AdamW(masters, g, lr(step)) ; params <- masters (O2 only)

``grad_sync`` and ``loss_reduce`` are injected by the parallel layer: callables on a tuple of
Tensors / a scalar Tensor that ``ms.jit`` can trace (e.g. ``ops.AllReduce`` cells), since they
run inside the compiled step. Dense models compile the step with ``ms.jit``; MoE models run
the same functions eagerly (their expert loop reads token counts on the host).
"""
from __future__ import annotations

from typing import Callable, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from mindport.train import amp as amp_lib
from mindport.train.config import TrainConfig
from mindport.train.optim import AdamW, lr_at, no_decay_names

GradSync = Callable[[tuple], tuple]
LossReduce = Callable[[Tensor], Tensor]


def _identity(x):
    return x


def global_norm(grads) -> Tensor:
    total = ops.zeros((), ms.float32)
    for g in grads:
        total = total + ops.square(g).sum()
    return ops.sqrt(total)


def apply_recompute(model, recompute: bool | int) -> int:
    """Recompute the activations of the first N decoder layers in backward (True: all)."""
    layers = list(model.layers.values()) if hasattr(model.layers, "values") else list(model.layers)
    count = len(layers) if recompute is True else int(recompute or 0)
    for layer in layers[:count]:
        layer.recompute()
    return min(count, len(layers))


class Trainer:
    """Holds the (possibly AMP-converted) model, the optimiser and the loss scaler.

    ``self.model`` is what trains (under O2 an fp16 copy of the model passed in);
    :meth:`fp32_weights` gives the full-precision weights by parameter name.
    """

    def __init__(self, model, config: TrainConfig, grad_sync: GradSync | None = None,
                 loss_reduce: LossReduce | None = None):
        self.config = config
        self.base_config = model.config
        self.level = config.amp_level
        self.masters: dict = {}
        if self.level == "O2":
            model, self.masters = amp_lib.build_o2(model, config.amp_dtype)
        elif self.level == "O1":
            amp_lib.apply_o1(model, config.amp_dtype)
        self.model = model
        self.recomputed_layers = apply_recompute(model, config.recompute)
        self.grad_sync = grad_sync or _identity
        self.loss_reduce = loss_reduce or _identity
        named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = ms.ParameterTuple([p for _, p in named])
        exempt = no_decay_names(model)
        opt_params = [self.masters.get(n, p) for n, p in named]
        self.optimizer = AdamW(opt_params, [n not in exempt for n in self.names], config.beta1, config.beta2,
                               config.eps, config.weight_decay)
        self.copy_back = tuple((p, self.masters[n]) for n, p in named if n in self.masters)
        self.scaler = amp_lib.loss_scaler(config.loss_scale_type, config.loss_scale, config.loss_scale_factor,
                                          config.loss_scale_window)
        self.dynamic = config.loss_scale_type == "dynamic"
        self.step = 0  # completed optimiser steps
        self.compiled = config.jit and not self.base_config.is_moe
        self._build()
        self._inputs_cache: tuple | None = None

    # ------------------------------------------------------------------ step functions
    def _build(self) -> None:
        model, scaler, clip = self.model, self.scaler, float(self.config.grad_clip)

        def loss_fn(ids, cos, sin, mask, labels):
            logits, router_loss, _ = model.forward(ids, cos, sin, mask)
            loss = model.loss(logits, router_loss, labels)
            return loss * scaler.scale_value.astype(loss.dtype), loss

        grad_fn = ms.value_and_grad(loss_fn, None, self.params, has_aux=True)

        def micro(ids, cos, sin, mask, labels):
            (_, loss), grads = grad_fn(ids, cos, sin, mask, labels)
            return loss, tuple(g.astype(ms.float32) for g in grads)

        def accumulate(acc, grads):
            return tuple(a + g for a, g in zip(acc, grads))

        def apply(grads, lr, inv_micro):
            # grads = sum over micro-batches of d(scale * loss); one multiply turns them into the
            # clipped mean gradient: coef = 1 / (micro * scale), times the clip factor
            grads = self.grad_sync(grads)
            coef = inv_micro / scaler.scale_value
            norm = global_norm(grads) * coef
            finite = ops.isfinite(norm)  # an inf/nan anywhere makes the norm non-finite
            if clip > 0:
                coef = coef * (clip / ops.maximum(norm, clip))
            grads = tuple(g * coef for g in grads)
            if self.dynamic:
                scaler.adjust(finite)
                if finite:
                    self.optimizer(grads, lr)
            else:
                self.optimizer(grads, lr)
            for param, master in self.copy_back:
                ops.assign(param, master.astype(param.dtype))
            return norm, finite

        def fused(ids, cos, sin, mask, labels, lr):
            loss, grads = micro(ids, cos, sin, mask, labels)
            norm, finite = apply(grads, lr, ops.ones((), ms.float32))
            return loss, norm, finite

        wrap = ms.jit if self.compiled else _identity
        self._micro, self._accumulate, self._apply, self._fused = wrap(micro), wrap(accumulate), wrap(apply), wrap(fused)

    def _inputs(self, batch: np.ndarray):
        ids = np.ascontiguousarray(batch, dtype=np.int32)
        if self._inputs_cache is None or self._inputs_cache[0] != ids.shape:
            _, cos, sin, mask, q_scale = self.model.prepare(ids)
            if q_scale is not None:
                from mindport.config import ConfigError

                raise ConfigError("key 'use_logn_attn' = True: training with logN query scaling is not supported "
                                  "(it applies beyond training_seqlen, at inference)")
            self._inputs_cache = (ids.shape, cos, sin, mask)
        _, cos, sin, mask = self._inputs_cache
        t = Tensor(ids)
        return t, cos, sin, mask, t

    def lr(self, step: int | None = None) -> float:
        c = self.config
        return lr_at(self.step if step is None else step, c.learning_rate, c.min_learning_rate, c.warmup_steps,
                     c.train_steps)

    def train_step(self, micro_batches: Sequence[np.ndarray]) -> dict:
        """One optimiser step over ``micro_batches`` (each (B, S) int token ids); returns its metrics."""
        lr_value = self.lr()
        lr = Tensor(lr_value, ms.float32)
        if len(micro_batches) == 1:
            loss, norm, finite = self._fused(*self._inputs(micro_batches[0]), lr)
        else:
            losses, acc = [], None
            for batch in micro_batches:
                loss, grads = self._micro(*self._inputs(batch))
                losses.append(loss)
                acc = grads if acc is None else self._accumulate(acc, grads)
            norm, finite = self._apply(acc, lr, Tensor(1.0 / len(micro_batches), ms.float32))
            loss = ops.stack(losses).mean()
        loss = self.loss_reduce(loss)
        self.step += 1
        return {"step": self.step, "loss": float(loss.asnumpy()), "lr": lr_value,
                "grad_norm": float(norm.asnumpy()), "loss_scale": float(self.scaler.scale_value.asnumpy()),
                "finite": bool(finite.asnumpy())}

    # ------------------------------------------------------------------ state
    def fp32_weights(self) -> dict[str, np.ndarray]:
        """Model parameter name -> fp32 array (the master copy under O2)."""
        out = {}
        for name, param in zip(self.names, self.params):
            src = self.masters.get(name, param)
            out[name] = src.astype(ms.float32).asnumpy() if src.dtype != ms.float32 else src.asnumpy()
        return out

    def load_fp32_weights(self, weights: dict[str, np.ndarray], source: str) -> None:
        from mindport.ckpt_tools.safetensors_io import CheckpointError

        for name, param in zip(self.names, self.params):
            if name not in weights:
                raise CheckpointError(f"{source}: missing tensor '{name}'")
            array = np.asarray(weights[name], dtype=np.float32)
            if tuple(array.shape) != tuple(param.shape):
                raise CheckpointError(f"{source}: tensor '{name}' has shape {list(array.shape)}, the model has "
                                      f"{list(param.shape)}")
            if name in self.masters:
                self.masters[name].set_data(Tensor(array))
            param.set_data(Tensor(array).astype(param.dtype))

    def state_tensors(self) -> dict:
        """Optimiser and loss-scale state: name -> Parameter (moments keyed by model parameter name,
        so O1 and O2 checkpoints resume into each other)."""
        opt = self.optimizer
        out = {"optimizer.step": opt.step}
        for name, m, v in zip(self.names, opt.exp_avg, opt.exp_avg_sq):
            out[f"exp_avg.{name}"] = m
            out[f"exp_avg_sq.{name}"] = v
        out["loss_scale.value"] = self.scaler.scale_value
        if self.dynamic:
            out["loss_scale.counter"] = self.scaler.counter
        return out
