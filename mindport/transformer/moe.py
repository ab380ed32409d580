"""Mixture-of-experts feed-forward in four steps: route -> dispatch -> experts -> combine.

Notation: T tokens (B*S), H hidden, E routed experts, I expert width, k experts per token,
N = T*k routing slots.

- route + dispatch: one fused operator (``ops/moe_routing``): fp32 softmax over E router
  logits, top-k (optionally renormalised), and the tokens copied into expert-grouped order.
- experts: SwiGLU per expert over its contiguous block of rows (stacked weights [E, I, H]).
- combine: the inverse permutation with the routing weights (same operator family).
- shared experts (optional): one SwiGLU of width ``shared_expert_intermediate_size`` on every
  token, added at weight 1 (XVERSE-MoE) or scaled by sigmoid(Linear(H -> 1)) (Qwen-MoE).

With ``capacity_factor`` > 0 each expert keeps at most ceil(capacity_factor * N / E) slots
(in token order); overflowing slots are dropped and counted.

Tensor parallelism splits every expert's ffn width (I/tp per rank) and the shared
expert's; routing is replicated; the partial outputs are reduced once on leaving.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindport import dispatch
from mindport.config import ModelConfig
from mindport.ops import moe_routing  # noqa: F401  (registers the routing backends)
from mindport.parallel.layers import Linear, region_entry, region_exit
from mindport.parallel.state import ParallelGroups
from mindport.transformer.layers import dtype_of
from mindport.transformer.mlp import SwiGLU


class RouterStats:
    """Per-layer routing statistics a model turns into its auxiliary losses and metrics."""

    @staticmethod
    def load_balancing(logits: Tensor, experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
        """(f, P): fraction of routing slots per expert summed over the k choices, and mean router
        probability per expert; the Switch/Mixtral loss is E * sum(f * P) over pooled layers."""
        probs = ops.softmax(logits.astype(ms.float32), -1)  # (T, E)
        one_hot = ops.one_hot(experts, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))  # (T, k, E)
        return one_hot.mean(0).sum(0), probs.mean(0)

    @staticmethod
    def z_loss(logits: Tensor) -> Tensor:
        return ops.square(ops.logsumexp(logits.astype(ms.float32), -1)).mean()


class Experts(nn.Cell):
    """E SwiGLU experts with stacked weights, applied to expert-grouped rows."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        e, i, h = config.num_experts, config.moe_intermediate_size // groups.tp.size, config.hidden_size
        dtype = dtype_of(config.param_dtype)
        self.compute_dtype = dtype_of(config.compute_dtype)
        init = Normal(config.initializer_range)
        self.gate_proj = Parameter(initializer(init, (e, i, h), dtype))
        self.up_proj = Parameter(initializer(init, (e, i, h), dtype))
        self.down_proj = Parameter(initializer(init, (e, h, i), dtype))
        self.num_experts = e
        self.act = dispatch.get("swiglu")

    def construct(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows (N, H) grouped by expert, counts (E,) -> (N, H); rows past sum(counts) stay zero.

        Expert block sizes are read on the host, so this runs in PYNATIVE mode.
        """
        sizes = [int(c) for c in counts.asnumpy()]
        outs, start = [], 0
        dt = self.compute_dtype
        for e, size in enumerate(sizes):
            if size == 0:
                continue
            x = rows[start:start + size].astype(dt)  # (n_e, H)
            hidden = self.act(ops.matmul(x, self.gate_proj[e].astype(dt).T), ops.matmul(x, self.up_proj[e].astype(dt).T))
            outs.append(ops.matmul(hidden, self.down_proj[e].astype(dt).T))
            start += size
        if start < rows.shape[0]:
            outs.append(ops.zeros((rows.shape[0] - start, rows.shape[1]), dt))
        return ops.cat(outs, 0)


class MoE(nn.Cell):
    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        h = config.hidden_size
        self.num_experts, self.top_k = config.num_experts, config.moe_top_k
        self.norm_topk_prob, self.norm_eps = config.norm_topk_prob, config.norm_topk_eps
        self.capacity_factor = config.capacity_factor
        self.entry, self.exit = region_entry(groups), region_exit(groups)
        self.router = Linear(h, config.num_experts, False, config)
        self.experts = Experts(config, groups)
        self.shared = None
        self.shared_gate = None
        if config.shared_expert_intermediate_size:
            self.shared = SwiGLU(config, groups, config.shared_expert_intermediate_size, enter_region=False,
                                 reduce=False)
            if config.shared_expert_gate:
                self.shared_gate = Linear(h, 1, False, config)
        self.gating_permute = dispatch.get("moe_gating_permute")
        self.unpermute_combine = dispatch.get("moe_unpermute_combine")

    def capacity(self, num_tokens: int) -> int:
        if not self.capacity_factor:
            return 0
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def construct(self, x: Tensor):
        """x (B, S, H) -> (out (B, S, H), (f (E,), P (E,), z-loss, dropped slots))."""
        x = self.entry(x)  # sequence parallel: gather the token shards
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)
        logits = self.router(tokens).astype(ms.float32)  # (T, E)
        weights, experts, rows, slot_rows, counts = self.gating_permute(
            logits, tokens, self.top_k, self.norm_topk_prob, self.norm_eps, self.capacity(b * s))
        expert_out = self.experts(rows, counts)  # (N, H)
        out = self.unpermute_combine(expert_out, slot_rows, weights).astype(x.dtype)  # (T, H)
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = ops.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared.astype(out.dtype)
        out = self.exit(out.reshape(b, s, h))
        f, p = RouterStats.load_balancing(logits, experts, self.num_experts)
        dropped = b * s * self.top_k - counts.sum()
        return out, (f, p, RouterStats.z_loss(logits), dropped)
