"""Preallocated key/value cache for incremental decoding.

Keys are cached after RoPE, so a cached key keeps the rotation it was written with; the
tables for new tokens are computed from the current total length (TeleChat2's published
behaviour past base_seqlen, and plain RoPE below it).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindport.config import ModelConfig
from mindport.dtypes import dtype_of


class LayerCache:
    """K and V of one layer, (B, Nkv, max_len, D), filled left to right."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype):
        self.k = ops.zeros((batch, num_kv_heads, max_len, head_dim), dtype)
        self.v = ops.zeros((batch, num_kv_heads, max_len, head_dim), dtype)
        self.length = 0
        self.max_len = max_len

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's k, v (B, Nkv, S, D); return all cached keys and values so far."""
        s = k.shape[2]
        end = self.length + s
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions requested, cache holds {self.max_len}")
        self.k[:, :, self.length:end] = k.astype(self.k.dtype)
        self.v[:, :, self.length:end] = v.astype(self.v.dtype)
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One :class:`LayerCache` per layer; ``length`` is the number of positions already cached.
    Under tensor parallelism (``tp_size``) each rank caches its Nkv/tp heads."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, tp_size: int = 1):
        dtype = dtype_of(config.compute_dtype) if config.compute_dtype != "bfloat16" else ms.float32
        self.layers = [LayerCache(batch, config.num_kv_heads // tp_size, max_len, config.head_dim, dtype)
                       for _ in range(config.num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class StaticLayerCache(nn.Cell):
    """K and V of one layer for compiled decoding: fixed shape (B, Nkv, max_len, D).

    ``update`` writes this step's single position selected by a one-hot ``write`` (1, 1, L, 1)
    and returns the whole cache; the caller masks positions not yet written. Every step has
    the same shapes, so a ``ms.jit`` decode step compiles once.
    """

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype):
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = Parameter(ops.zeros(shape, dtype), requires_grad=False)
        self.v = Parameter(ops.zeros(shape, dtype), requires_grad=False)
        self.write = Parameter(ops.zeros((1, 1, max_len, 1), dtype), requires_grad=False)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, Nkv, S, D): one decode position (S = 1, broadcast to the one-hot ``write``)
        or the prompt at positions [0, S) (prefill)."""
        length = self.k.shape[2]
        if k.shape[2] > 1:  # prefill at position 0: pad to the cache length
            pad = ops.zeros(k.shape[:2] + (length - k.shape[2],) + k.shape[3:], self.k.dtype)
            k, v = ops.cat((k.astype(self.k.dtype), pad), 2), ops.cat((v.astype(self.v.dtype), pad), 2)
        keep = 1 - self.write
        k_all = self.k * keep + k.astype(self.k.dtype) * self.write
        v_all = self.v * keep + v.astype(self.v.dtype) * self.write
        ops.assign(self.k, k_all)
        ops.assign(self.v, v_all)
        return k_all, v_all
