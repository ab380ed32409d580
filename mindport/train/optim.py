"""AdamW (decoupled weight decay, bias-corrected) and the warm-up + cosine learning rate.

The update is torch.optim.AdamW's:

    p *= 1 - lr * wd
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

:func:`adamw_step` does it per tensor: one multiply for the decay, then MindSpore's fused
``ApplyAdam`` kernel, which bias-corrects by lr' = lr sqrt(1 - b2^t) / (1 - b1^t) and is given
eps' = eps sqrt(1 - b2^t). On CPU that pair is about 5x faster than the ``AdamWeightDecay``
kernel (16.4M parameters: 25 ms vs 116 ms). Norm weights and biases are never decayed.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from mindport.parallel.sharding import is_norm


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
    names = set()
    for cell_name, cell in model.cells_and_names():
        for pname, _ in cell.parameters_and_names(expand=False):
            full = f"{cell_name}.{pname}" if cell_name else pname
            if is_norm(full) or pname.endswith("bias"):
                names.add(full)
    return names


_APPLY_ADAM = ops.Adam()


def bias_correction(step, beta1: float, beta2: float, eps: float):
    """((b1^t, b2^t), eps sqrt(1 - b2^t)): what :func:`adamw_step` is given for torch's AdamW at
    step t (1-based, a tensor)."""
    powers = (ops.pow(beta1, step), ops.pow(beta2, step))
    return powers, eps * ops.sqrt(1.0 - powers[1])


def adamw_step(param, m, v, grad, lr, weight_decay, beta_powers, betas, eps):
    """One AdamW step on one fp32 tensor, in place: ``param *= 1 - lr * weight_decay`` (skipped
    when ``weight_decay`` is None), then ApplyAdam. ``beta_powers`` (b1^t, b2^t) set the bias
    correction (zeros: none, as MindSpore's nn.AdamWeightDecay); ``eps`` is added to sqrt(v) as
    given. All scalars are fp32 tensors; returns the kernel's output, for ordering."""
    if weight_decay is not None:
        ops.assign(param, param * (1.0 - lr * weight_decay))
    return _APPLY_ADAM(param, m, v, beta_powers[0], beta_powers[1], lr, betas[0], betas[1], eps, grad)


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
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = Tensor(weight_decay, ms.float32)
        self.betas = (Tensor(beta1, ms.float32), Tensor(beta2, ms.float32))

    def construct(self, grads, lr):
        t = self.step + 1.0
        ops.assign(self.step, t)
        powers, eps = bias_correction(t, self.beta1, self.beta2, self.eps)
        done = True
        for i in range(len(self.params)):
            out = adamw_step(self.params[i], self.exp_avg[i], self.exp_avg_sq[i], grads[i].astype(ms.float32), lr,
                             self.weight_decay if self.decay[i] else None, powers, self.betas, eps)
            done = ops.depend(done, out)
        return done
