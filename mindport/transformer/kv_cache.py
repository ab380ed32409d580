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
    """K and V of one layer for compiled decoding: ``slots`` rows of ``max_len`` positions, stored
    flat as (slots * Nkv, max_len, D) so that a (row, position) pair indexes one head vector.

    A step computes the first b rows. ``write`` (slots, 1, max_len, 1) is 1 at the positions each
    row writes this step, from its own length on (rows hold sequences of different lengths);
    ``update`` scatters the step's b * Nkv * S vectors there and returns the b rows' whole caches,
    the caller masking positions not written yet. ``write`` is a Parameter the decoder assigns,
    because attention calls ``update(k, v)`` only. Every (b, S) compiles once under ``ms.jit``.

    The scatter costs ~0.2 ms a layer where blending the whole cache (``k * (1 - write) + new *
    write``) cost ~3 ms (8 rows, 4 heads, 256 x 64, fp32, 2 cores). Observed with MindSpore 2.10 on
    CPU: a slice of a Parameter assigned in the same graph, or index arithmetic on it, may read the
    value from before the assign, elementwise arithmetic reads it in order; hence ``write * 1``
    first, and the write position as its argmax. A row whose ``write`` is all 0 (padding in a batch
    bucket) writes at position 0 of its own, free, row.
    """

    def __init__(self, slots: int, num_kv_heads: int, max_len: int, head_dim: int, dtype):
        super().__init__()
        shape = (slots * num_kv_heads, max_len, head_dim)
        self.num_slots, self.num_kv_heads, self.max_len = slots, num_kv_heads, max_len
        self.k = Parameter(ops.zeros(shape, dtype), requires_grad=False)
        self.v = Parameter(ops.zeros(shape, dtype), requires_grad=False)
        self.write = Parameter(ops.zeros((slots, 1, max_len, 1), dtype), requires_grad=False)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (b, Nkv, S, D) written at positions start + [0, S) of rows [0, b), start the first 1 of
        each row's ``write`` -> the b rows' caches (b, Nkv, max_len, D)."""
        b, n, s, d = k.shape
        length = self.max_len
        write = self.write * 1
        if b < self.num_slots:  # a static condition: a full batch slices nothing
            write = write[:b]
        starts = ops.argmax(write.reshape(b, length), -1).astype(ms.int32)  # (b,)
        rows = ops.arange(b * n, dtype=ms.int32).reshape(b, n, 1)  # row r, head h -> r * Nkv + h
        positions = starts.reshape(b, 1, 1) + ops.arange(s, dtype=ms.int32).reshape(1, 1, s)
        index = ops.stack((ops.broadcast_to(rows, (b, n, s)), ops.broadcast_to(positions, (b, n, s))), -1)
        k_all = ops.scatter_nd_update(self.k, index, k.astype(self.k.dtype))  # (slots * Nkv, L, D)
        v_all = ops.scatter_nd_update(self.v, index, v.astype(self.v.dtype))
        if b < self.num_slots:
            k_all, v_all = k_all[:b * n], v_all[:b * n]
        return k_all.reshape(b, n, length, d), v_all.reshape(b, n, length, d)
