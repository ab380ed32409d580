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
    """K and V of one layer for compiled decoding: ``slots`` rows (B, Nkv, max_len, D) of fixed shape.

    A step computes the first b rows. ``write`` (slots, 1, max_len, 1) is 1 at the positions each
    row writes this step (its own length: rows hold sequences of different lengths; a row with no
    1 is left as it is); ``update`` blends them in and returns the b rows' whole caches, the caller
    masking positions not written yet. ``write`` is a Parameter the decoder assigns, because
    attention calls ``update(k, v)`` only. Every (b, S) compiles once under ``ms.jit``.

    Why a blend and not a scatter of each row's position: with MindSpore 2.10 on CPU, index
    arithmetic on a Parameter assigned in the same graph (scatter/gather indices), and a slice of
    such a Parameter, were seen reading the value from before the assign; elementwise arithmetic
    reads it in order (hence ``write * 1`` before slicing).
    """

    def __init__(self, slots: int, num_kv_heads: int, max_len: int, head_dim: int, dtype):
        super().__init__()
        shape = (slots, num_kv_heads, max_len, head_dim)
        self.num_slots = slots
        self.k = Parameter(ops.zeros(shape, dtype), requires_grad=False)
        self.v = Parameter(ops.zeros(shape, dtype), requires_grad=False)
        self.write = Parameter(ops.zeros((slots, 1, max_len, 1), dtype), requires_grad=False)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (b, Nkv, S, D): one decode position per row (S = 1, broadcast to its ``write``) or
        prompts at positions [0, S) (prefill) -> the b rows' caches (b, Nkv, max_len, D)."""
        b, _, s, _ = k.shape
        length = self.k.shape[2]
        if s > 1:  # prefill at position 0: pad to the cache length
            pad = ops.zeros(k.shape[:2] + (length - s,) + k.shape[3:], self.k.dtype)
            k, v = ops.cat((k.astype(self.k.dtype), pad), 2), ops.cat((v.astype(self.v.dtype), pad), 2)
        whole, dtype = b == self.num_slots, self.k.dtype
        write = self.write if whole else (self.write * 1)[:b]
        k_rows = (self.k if whole else self.k[:b]) * (1 - write) + k.astype(dtype) * write
        v_rows = (self.v if whole else self.v[:b]) * (1 - write) + v.astype(dtype) * write
        if whole:
            ops.assign(self.k, k_rows)
            ops.assign(self.v, v_rows)
        else:  # rows [0, b): constant indices
            rows = ops.arange(b, dtype=ms.int32)
            ops.scatter_update(self.k, rows, k_rows)
            ops.scatter_update(self.v, rows, v_rows)
        return k_rows, v_rows
