"""Preallocated key/value cache for incremental decoding.

Keys are cached after RoPE, so a cached key keeps the rotation it was written with; the
tables for new tokens are computed from the current total length (TeleChat2's published
behaviour past base_seqlen, and plain RoPE below it).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from mindport.config import ModelConfig
from mindport.transformer.layers import dtype_of


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
