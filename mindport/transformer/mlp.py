"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

from mindspore import Tensor, nn

from mindport import dispatch
from mindport.config import ModelConfig
from mindport.transformer.layers import linear


class SwiGLU(nn.Cell):
    def __init__(self, config: ModelConfig, width: int, gate_up_bias: bool = False, down_bias: bool = False):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = linear(config, h, width, gate_up_bias, role="column")
        self.up_proj = linear(config, h, width, gate_up_bias, role="column")
        self.down_proj = linear(config, width, h, down_bias, role="row")
        self.act = dispatch.get("swiglu")

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


def dense_mlp(config: ModelConfig) -> SwiGLU:
    return SwiGLU(config, config.ffn_hidden_size, config.gate_up_bias, config.down_bias)
