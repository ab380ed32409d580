"""Pre-norm decoder layer: x += Attn(norm(x)); x += MLP(norm(x))."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindport.config import ModelConfig
from mindport.transformer.attention import Attention
from mindport.transformer.layers import RMSNorm
from mindport.transformer.mlp import dense_mlp


class DecoderLayer(nn.Cell):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.is_moe = config.is_moe
        if self.is_moe:
            from mindport.transformer.moe import MoE

            self.mlp = MoE(config)
        else:
            self.mlp = dense_mlp(config)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, q_scale: Tensor | None = None,
                  cache=None) -> tuple[Tensor, Tensor]:
        """Returns the new hidden states and this layer's auxiliary (router) loss, 0 when dense."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, q_scale, cache)
        if self.is_moe:
            out, aux = self.mlp(self.mlp_norm(x))
            return x + out, aux
        return x + self.mlp(self.mlp_norm(x)), ops.zeros((), ms.float32)
