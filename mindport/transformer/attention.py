"""Causal self-attention: MHA or GQA, separate or per-head-interleaved K/V projection."""
from __future__ import annotations

import math

import numpy as np
from mindspore import Tensor, nn, ops

from mindport import dispatch
from mindport.config import ModelConfig
from mindport.parallel.layers import Linear, RowParallelLinear, region_entry
from mindport.parallel.state import ParallelGroups

MASK_VALUE = float(np.finfo(np.float32).min)  # additive mask of a hidden position


class Attention(nn.Cell):
    """Projections, RoPE, the attention core (dispatched) and the output projection.

    ``kv_layout="interleaved"`` keeps TeleChat2's fused ``key_value`` weight as published:
    rows grouped per kv head as (Nkv, 2, D, H), so a split by kv head stays contiguous.
    Under tensor parallelism each rank holds N/tp query heads and Nkv/tp kv heads.
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        h, d, tp = config.hidden_size, config.head_dim, groups.tp.size
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads // tp, config.num_kv_heads // tp, d
        self.scale = 1.0 / math.sqrt(d)
        self.interleaved_kv = config.kv_layout == "interleaved"
        self.entry = region_entry(groups)
        self.q_proj = Linear(h, self.num_heads * d, config.qkv_bias, config)
        if self.interleaved_kv:
            self.kv_proj = Linear(h, 2 * self.num_kv_heads * d, config.qkv_bias, config)
        else:
            self.k_proj = Linear(h, self.num_kv_heads * d, config.qkv_bias, config)
            self.v_proj = Linear(h, self.num_kv_heads * d, config.qkv_bias, config)
        self.o_proj = RowParallelLinear(config.num_heads * d, h, config.o_bias, config, groups)
        self.rotary = dispatch.get("rotary")
        if groups.cp.size > 1:  # K/V of the whole sequence come from the other context-parallel ranks
            from mindport.parallel.context import ContextParallelAttention

            self.attend = ContextParallelAttention(config, groups)
        else:
            self.attend = dispatch.get("attention")

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """k, v of shape (B, Nkv, S, D) before RoPE."""
        b, s, _ = x.shape
        if self.interleaved_kv:
            # (B, S, Nkv * 2 * D) -> (B, Nkv, S, 2 * D): each head's k then v, split along the last
            # axis (on CPU about 15x faster than slicing the middle axis of (B, S, Nkv, 2, D))
            kv = self.kv_proj(x).reshape(b, s, self.num_kv_heads, 2 * self.head_dim).swapaxes(1, 2)
            k, v = ops.split(kv, self.head_dim, axis=-1)
            return k, v
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        return k.swapaxes(1, 2), v.swapaxes(1, 2)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, q_scale: Tensor | None = None,
                  cache=None) -> Tensor:
        """x (B, S, H) or its sequence shard; cos/sin (B, 1, S, D); mask additive, (B|1, 1, S, Sk); q_scale (B, 1, S, 1) or None.

        ``cache`` (a :class:`mindport.transformer.kv_cache.LayerCache`) appends this step's keys
        and values and returns the full K/V to attend over.
        """
        x = self.entry(x)  # sequence parallel: (B, S/tp, H) -> (B, S, H)
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim).swapaxes(1, 2)  # (B, N, S, D)
        k, v = self.project_kv(x)
        cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        if q_scale is not None:
            q = q * q_scale.astype(q.dtype)
        if cache is not None:
            k, v = cache.update(k, v)
        out = self.attend(q, k, v, mask, self.scale)  # (B, N, S, D)
        return self.o_proj(out.swapaxes(1, 2).reshape(b, s, self.num_heads * self.head_dim))
