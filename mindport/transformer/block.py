"""Pre-norm decoder layer: x += Attn(norm(x)); x += MLP(norm(x))."""
from __future__ import annotations

from mindspore import Tensor, nn

from mindport.config import ModelConfig
from mindport.parallel.state import ParallelGroups
from mindport.transformer.attention import Attention
from mindport.transformer.layers import RMSNorm
from mindport.transformer.mlp import dense_mlp


class DecoderLayer(nn.Cell):
    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.attn = Attention(config, groups)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.is_moe = config.is_moe
        if self.is_moe:
            from mindport.transformer.moe import MoE

            self.mlp = MoE(config, groups)
        else:
            self.mlp = dense_mlp(config, groups)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, q_scale: Tensor | None = None,
                  cache=None, token_mask: Tensor | None = None):
        """The new hidden states and this layer's router statistics (None when dense); ``token_mask``
        (B, S): the tokens the router statistics count (:class:`~mindport.transformer.moe.MoE`)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, q_scale, cache)
        if self.is_moe:
            out, stats = self.mlp(self.mlp_norm(x), token_mask)
            return x + out, stats
        return x + self.mlp(self.mlp_norm(x)), None
