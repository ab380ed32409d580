"""Small shared cells and helpers: RMSNorm, dtype names, token-id conversion.

Every projection is a :class:`mindport.parallel.layers.Linear` (or its row-parallel
form), sized from the slicing table, so single-device and tensor-parallel models are the
same code with different group sizes.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import initializer

from mindport import dispatch
from mindport.config import ModelConfig
from mindport.dtypes import dtype_of
from mindport.transformer import kernels  # noqa: F401  (registers the core ops)

class RMSNorm(nn.Cell):
    """Root-mean-square norm with fp32 statistics (dispatches to the fused kernel on Ascend)."""

    def __init__(self, hidden_size: int, eps: float, config: ModelConfig):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (hidden_size,), dtype_of(config.param_dtype)))
        self.norm = dispatch.get("rms_norm")

    def construct(self, x: Tensor) -> Tensor:
        return self.norm(x, self.weight.astype(x.dtype), self.eps)


def as_array(x) -> np.ndarray:
    """The host (numpy) copy of token ids or a mask given as a numpy array, list or Tensor."""
    return np.asarray(x.asnumpy() if isinstance(x, Tensor) else x)


def as_tensor(x, dtype=ms.int32) -> Tensor:
    """Accept numpy arrays, lists or Tensors for token ids."""
    if isinstance(x, Tensor):
        return x.astype(dtype) if x.dtype != dtype else x
    return Tensor(np.asarray(x), dtype)
