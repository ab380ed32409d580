"""AdamW (decoupled weight decay, bias-corrected) and the warm-up + cosine learning rate.

The update is torch.optim.AdamW's:

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr * (wd * p + (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps))

computed by MindSpore's fused ``AdamWeightDecay`` kernel (one pass over each tensor), which
has no bias correction; it is folded into the kernel's inputs:
lr' = lr sqrt(1 - b2^t) / (1 - b1^t), eps' = eps sqrt(1 - b2^t), wd' = wd / (lr' / lr).
Norm weights and biases are never decayed.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


def lr_at(step: int, peak: float, minimum: float, warmup: int, total: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``peak`` over
    ``warmup`` steps (step 0 gets peak / warmup), then cosine decay to ``minimum`` at ``total``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))


def no_decay_names(model) -> set[str]:
    """Parameters exempt from weight decay: every norm weight and every bias."""
    from mindport.transformer.layers import RMSNorm

    names = set()
    for cell_name, cell in model.cells_and_names():
        for pname, _ in cell.parameters_and_names(expand=False):
            full = f"{cell_name}.{pname}" if cell_name else pname
            if isinstance(cell, RMSNorm) or pname.endswith("bias"):
                names.add(full)
    return names


class AdamW(nn.Cell):
    """AdamW over ``params``; ``decay[i]`` says whether params[i] is weight-decayed.

    ``construct(grads, lr)`` updates in place and returns True. State: ``exp_avg.*``,
    ``exp_avg_sq.*`` (fp32, shaped like the params) and ``step`` (completed updates).
    """

    def __init__(self, params, decay: list[bool], beta1: float, beta2: float, eps: float, weight_decay: float):
        super().__init__()
        self.params = ParameterTuple(params)
        for p in self.params:
            if p.dtype != ms.float32:
                raise TypeError(f"AdamW: parameter '{p.name}' is {p.dtype}; the optimiser updates fp32 (master) "
                                "weights")
        self.exp_avg = self.params.clone("exp_avg", "zeros")
        self.exp_avg_sq = self.params.clone("exp_avg_sq", "zeros")
        self.decay = tuple(bool(d) for d in decay)
        self.step = Parameter(Tensor(0.0, ms.float32), name="optimizer.step")
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.b1 = Tensor(np.array([beta1], np.float32))
        self.b2 = Tensor(np.array([beta2], np.float32))
        self.kernel = ops.AdamWeightDecay()

    def construct(self, grads, lr):
        t = self.step + 1.0
        ops.assign(self.step, t)
        bc1 = 1.0 - ops.pow(self.beta1, t)
        root_bc2 = ops.sqrt(1.0 - ops.pow(self.beta2, t))
        lr_k = lr * root_bc2 / bc1
        eps_k = (self.eps * root_bc2).reshape(1)
        wd_k = (self.weight_decay * bc1 / root_bc2).reshape(1)
        zero = ops.zeros((1,), ms.float32)
        lr_k = lr_k.reshape(1)
        done = True
        for i in range(len(self.params)):
            wd = wd_k if self.decay[i] else zero
            out = self.kernel(self.params[i], self.exp_avg[i], self.exp_avg_sq[i], lr_k, self.b1, self.b2, eps_k, wd,
                              grads[i].astype(ms.float32))
            done = ops.depend(done, out)
        return done
