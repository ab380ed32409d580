"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

from mindspore import Tensor, nn

from mindport import dispatch
from mindport.config import ModelConfig
from mindport.parallel.layers import Linear, RowParallelLinear, region_entry
from mindport.parallel.state import ParallelGroups


class SwiGLU(nn.Cell):
    """Column-parallel gate/up (width/tp columns each), row-parallel down.

    ``enter_region`` False when the caller already entered the tensor-parallel region
    (the MoE layer's shared expert).
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups, width: int, gate_up_bias: bool = False,
                 down_bias: bool = False, enter_region: bool = True, reduce: bool = True):
        super().__init__()
        h, local = config.hidden_size, width // groups.tp.size
        self.entry = region_entry(groups) if enter_region else None
        self.gate_proj = Linear(h, local, gate_up_bias, config)
        self.up_proj = Linear(h, local, gate_up_bias, config)
        if reduce:
            self.down_proj = RowParallelLinear(width, h, down_bias, config, groups)
        else:  # partial sums, reduced by the caller together with other partial outputs
            self.down_proj = Linear(local, h, down_bias, config)
        self.act = dispatch.get("swiglu")

    def construct(self, x: Tensor) -> Tensor:
        if self.entry is not None:
            x = self.entry(x)
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


def dense_mlp(config: ModelConfig, groups: ParallelGroups) -> SwiGLU:
    return SwiGLU(config, groups, config.ffn_hidden_size, config.gate_up_bias, config.down_bias)
