"""Compiled decoding: a model plus static per-layer caches, one ``ms.jit`` step per call.

A cache holds ``slots`` rows of ``max_len`` positions. A step computes the first b <= slots rows,
each writing from where its ``write`` row says (its own length), so rows of different lengths
(continuous batching: :mod:`mindport.infer.engine`) and a plain batch
(:func:`mindport.infer.generate.generate`: one write row shared by all) share one mechanism.
One graph is compiled per input shape (b, S).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from mindport.transformer.attention import MASK_VALUE
from mindport.transformer.kv_cache import StaticLayerCache
from mindport.transformer.layers import dtype_of
from mindport.transformer.rope import logn_scale, rope_tables


class CompiledDecoder(nn.Cell):
    """A model plus static caches; ``step`` is one compiled forward (prefill or one token per row).

    Row i's S new positions are written from the first 1 of its ``write`` row ((1 or slots), 1, L, 1;
    a single row applies to all); ``mask`` (b, 1, S, L) hides positions not written yet, so stale
    values from an earlier sequence are never read.
    """

    def __init__(self, model, batch: int, max_len: int):
        super().__init__()
        config = model.config
        dtype = dtype_of(config.compute_dtype) if config.compute_dtype != "bfloat16" else ms.float32
        self.model = model
        self.slots, self.max_len = batch, max_len
        self.caches = nn.CellList([StaticLayerCache(batch, config.num_kv_heads // model.groups.tp.size, max_len,
                                                    config.head_dim, dtype) for _ in range(len(model.layer_ids))])
        self.step = ms.jit(self.construct)
        self.move_row = ms.jit(self.move)

    def construct(self, ids: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, write: Tensor, q_scale=None) -> Tensor:
        """Full-vocabulary logits (b, S, V) of this step."""
        write = ops.broadcast_to(write, self.caches[0].write.shape)
        for cache in self.caches:
            ops.assign(cache.write, write)
        local = self.model.forward(ids, cos, sin, mask, q_scale, self.caches)[0]
        return self.model.full_logits(local)

    def move(self, src: Tensor, dst: Tensor) -> Tensor:
        """Copy cache row ``src`` (1,) into row ``dst`` (1,), every layer's K and V."""
        heads = self.caches[0].num_kv_heads
        src_rows = src * heads + ops.arange(heads, dtype=src.dtype)  # (Nkv,) flat cache rows
        dst_rows = dst * heads + ops.arange(heads, dtype=dst.dtype)
        for cache in self.caches:
            ops.scatter_update(cache.k, dst_rows, ops.gather(cache.k, src_rows, 0))
            ops.scatter_update(cache.v, dst_rows, ops.gather(cache.v, src_rows, 0))
        return dst

    def row_inputs(self, ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        """Step inputs for rows holding independent sequences: row i's tokens ``ids[i]`` (b, S) sit at
        positions ``starts[i] + [0, S)``, the first ``lengths[i]`` real (the rest right padding). Each
        row gets the RoPE tables of its own total length and a causal mask over its own cache row.
        Returns (ids, cos, sin, mask, q_scale) as Tensors; ``write`` is the caller's."""
        b, s = ids.shape
        config = self.model.config
        cos, sin = np.empty((b, 1, s, config.head_dim), np.float32), np.empty((b, 1, s, config.head_dim), np.float32)
        positions = starts[:, None] + np.arange(s)[None]  # (b, S)
        for i in range(b):
            table_cos, table_sin = rope_tables(config, int(starts[i] + lengths[i]), self.max_len)
            cos[i, 0], sin[i, 0] = table_cos[starts[i]:starts[i] + s], table_sin[starts[i]:starts[i] + s]
        keys = np.arange(self.max_len)
        mask = np.where(keys[None, None] <= positions[:, :, None], 0.0, MASK_VALUE).astype(np.float32)[:, None]
        q_scale = Tensor(logn_scale(config, positions)[:, None, :, None]) if config.use_logn_attn else None
        return Tensor(ids.astype(np.int32)), Tensor(cos), Tensor(sin), Tensor(mask), q_scale

