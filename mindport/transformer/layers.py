"""Basic cells: Linear (the single linear type every projection goes through), RMSNorm,
Embedding. Weights are stored (out, in) like HuggingFace's, so checkpoints map 1:1.

Tensor parallelism will subclass :class:`Linear` (column/row split); model code only
asks :func:`linear` for a projection with a role, so it never changes when TP lands.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Zero, initializer

from mindport.config import ModelConfig
from mindport.transformer.kernels import rms_norm

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def dtype_of(name: str):
    return DTYPES[name]


class Linear(nn.Cell):
    """y = x W^T (+ b), W of shape (out_features, in_features), computed in ``compute_dtype``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: ModelConfig):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        param_dtype = dtype_of(config.param_dtype)
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.weight = Parameter(initializer(Normal(config.initializer_range), (out_features, in_features), param_dtype))
        self.bias = Parameter(initializer(Zero(), (out_features,), param_dtype)) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features).astype(self.compute_dtype), self.weight.astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.astype(self.compute_dtype)
        return y.reshape(*lead, self.out_features)


def linear(config: ModelConfig, in_features: int, out_features: int, bias: bool = False, role: str = "replicated") -> Linear:
    """Build a projection. ``role`` ("column", "row", "replicated") tells the parallel layer how it splits."""
    del role  # single-device layout; the parallel layer factory uses it
    return Linear(in_features, out_features, bias, config)


class RMSNorm(nn.Cell):
    """Root-mean-square norm with fp32 statistics (dispatches to the fused kernel on Ascend)."""

    def __init__(self, hidden_size: int, eps: float, config: ModelConfig):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (hidden_size,), dtype_of(config.param_dtype)))

    def construct(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight.astype(x.dtype), self.eps)


class Embedding(nn.Cell):
    """Token embedding table (V, H)."""

    def __init__(self, vocab_size: int, hidden_size: int, config: ModelConfig):
        super().__init__()
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.weight = Parameter(initializer(Normal(config.initializer_range), (vocab_size, hidden_size),
                                            dtype_of(config.param_dtype)))

    def construct(self, input_ids: Tensor) -> Tensor:
        return ops.gather(self.weight, input_ids, 0).astype(self.compute_dtype)


def as_tensor(x, dtype=ms.int32) -> Tensor:
    """Accept numpy arrays, lists or Tensors for token ids."""
    if isinstance(x, Tensor):
        return x.astype(dtype) if x.dtype != dtype else x
    return Tensor(np.asarray(x), dtype)
