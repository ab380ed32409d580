"""Compiled decoding: a model plus static per-layer caches, one ``ms.jit`` step per call."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindport.transformer.kv_cache import StaticLayerCache
from mindport.transformer.layers import dtype_of


class CompiledDecoder(nn.Cell):
    """A model plus static caches; ``step`` is one compiled forward (prefill or one token).

    The cache is written at the positions where ``write`` (1, 1, L, 1) is 1; ``mask``
    (B, 1, S, L) hides positions not written yet, so stale values from an earlier
    generation are never read.
    """

    def __init__(self, model, batch: int, max_len: int):
        super().__init__()
        config = model.config
        dtype = dtype_of(config.compute_dtype) if config.compute_dtype != "bfloat16" else ms.float32
        self.model = model
        self.max_len = max_len
        self.caches = nn.CellList([StaticLayerCache(batch, config.num_kv_heads // model.groups.tp.size, max_len,
                                                    config.head_dim, dtype) for _ in range(config.num_layers)])
        self.step = ms.jit(self.construct)

    def construct(self, ids: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, write: Tensor, q_scale=None) -> Tensor:
        """Full-vocabulary logits (B, S, V) of this step."""
        for cache in self.caches:
            ops.assign(cache.write, write)
        local = self.model.forward(ids, cos, sin, mask, q_scale, self.caches)[0]
        return self.model.full_logits(local)
