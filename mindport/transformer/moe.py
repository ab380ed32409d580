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
expert's; routing is replicated; the partial outputs are reduced once on leaving. The
router's (and the shared gate's) gradient is then partial on each tp rank (it comes through
the combine of partial outputs) and is summed over tp with the other partial gradients
(``partial_over_tp`` in :mod:`mindport.parallel.sharding`); the router statistics, the same
on every tp rank, back-propagate 1/tp of themselves on each so that sum counts them once.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindport import dispatch
from mindport.config import ModelConfig
from mindport.dtypes import dtype_of
from mindport.ops import moe_routing  # noqa: F401  (registers the routing backends)
from mindport.parallel.comm import AllToAll, GatherFromGroup, ReduceScatterToGroup, ShareGradient, collectives
from mindport.parallel.layers import Linear, log_shifted_sum, region_entry, region_exit
from mindport.parallel.state import ParallelGroups
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
        x = logits.astype(ms.float32)
        top = ops.stop_gradient(x.max(-1, keepdims=True))
        lse = top.squeeze(-1) + log_shifted_sum(ops.exp(x - top).sum(-1))  # logsumexp, reproducibly rounded
        return ops.square(lse).mean()


class Experts(nn.Cell):
    """E SwiGLU experts with stacked weights, applied to expert-grouped rows."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        e = config.num_experts // groups.ep.size  # this rank's experts
        i, h = config.moe_intermediate_size // groups.tp.size, config.hidden_size
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
    """Router, routed experts (E/ep per expert-parallel rank), optional shared expert.

    Expert parallelism (``expert_parallel`` > 1) has two token dispatchers with the same
    capacity and drop semantics as one process holding every token of the ep group in rank
    order (capacity counts the group's tokens; a slot keeps its place in token order):

    - ``allgather``: every rank gathers the group's tokens, routes them all, runs its own
      experts on the rows routed to them, and a reduce-scatter returns each rank its tokens'
      summed outputs. Two collectives a layer.
    - ``alltoall``: each rank routes its own tokens, exchanges per-expert counts, drops over
      capacity in global token order, and one all-to-all sends each row to its expert's rank
      (padded to the largest block), a second brings the outputs back.
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        h = config.hidden_size
        self.num_experts, self.top_k = config.num_experts, config.moe_top_k
        self.norm_topk_prob, self.norm_eps = config.norm_topk_prob, config.norm_topk_eps
        self.capacity_factor = config.capacity_factor
        self.entry, self.exit = region_entry(groups), region_exit(groups)
        self.router = Linear(h, config.num_experts, False, config)
        self.tp_share = ShareGradient(groups.tp)  # router statistics: replicated over tp (module docstring)
        self.ep, self.ep_rank = groups.ep.size, groups.ep.rank
        self.local_experts = config.num_experts // self.ep
        self.experts = Experts(config, groups)
        self.dispatcher = groups.config.moe_token_dispatcher if self.ep > 1 else "local"
        if self.ep > 1:
            self.ep_comm = collectives(groups.ep)
            self.ep_gather = GatherFromGroup(groups.ep, 0)
            self.ep_scatter = ReduceScatterToGroup(groups.ep, 0)
            self.ep_all_to_all = AllToAll(groups.ep, 0, 0)
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

    def _route(self, logits: Tensor, tokens: Tensor, capacity: int):
        return self.gating_permute(logits, tokens, self.top_k, self.norm_topk_prob, self.norm_eps, capacity)

    def _local(self, tokens: Tensor, logits: Tensor):
        weights, experts, rows, slot_rows, counts = self._route(logits, tokens, self.capacity(tokens.shape[0]))
        out = self.unpermute_combine(self.experts(rows, counts), slot_rows, weights)
        return out, experts, counts.sum()

    def _allgather(self, tokens: Tensor, logits: Tensor):
        t = tokens.shape[0]
        all_tokens = self.ep_gather(tokens)  # (ep*T, H)
        all_logits = self.router(all_tokens).astype(ms.float32)
        weights, experts, rows, slot_rows, counts = self._route(all_logits, all_tokens, self.capacity(t * self.ep))
        sizes = counts.asnumpy()
        e0, e1 = self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts
        start, mine = int(sizes[:e0].sum()), int(sizes[e0:e1].sum())
        n, h = rows.shape
        local = self.experts(rows[start:start + mine], counts[e0:e1])  # my experts' rows only
        parts = [p for p, size in ((ops.zeros((start, h), local.dtype), start), (local, mine),
                                   (ops.zeros((n - start - mine, h), local.dtype), n - start - mine)) if size]
        partial = self.unpermute_combine(ops.cat(parts, 0), slot_rows, weights)  # (ep*T, H): my experts' share
        out = self.ep_scatter(partial)  # summed over ranks, my tokens
        mine_slots = slot_rows[self.ep_rank * t * self.top_k:(self.ep_rank + 1) * t * self.top_k]
        kept = (mine_slots >= 0).astype(ms.int32).sum()
        return out, experts[self.ep_rank * t:(self.ep_rank + 1) * t], kept

    def _alltoall(self, tokens: Tensor, logits: Tensor):
        ep, k = self.ep, self.top_k
        n_local = self.local_experts
        weights, experts, rows, slot_rows, counts = self._route(logits, tokens, 0)  # dropless locally
        n, h = rows.shape
        all_counts = self.ep_comm.all_gather(ops.expand_dims(counts, 0), 0).asnumpy().astype(np.int64)  # (ep, E)
        capacity = self.capacity(tokens.shape[0] * ep)
        if capacity:  # slots of lower ranks come first in token order
            before = np.cumsum(all_counts, 0) - all_counts
            kept_all = np.clip(capacity - before, 0, all_counts)
        else:
            kept_all = all_counts
        kept = kept_all[self.ep_rank]
        block = np.cumsum(all_counts[self.ep_rank]) - all_counts[self.ep_rank]
        send_rows = [np.concatenate([np.arange(block[e], block[e] + kept[e]) for e in range(j * n_local, (j + 1) * n_local)])
                     for j in range(ep)]
        width = max(1, int(max(kept_all[i, j * n_local:(j + 1) * n_local].sum() for i in range(ep) for j in range(ep))))
        pad = n  # index of an appended zero row
        send_index = np.full((ep, width), pad, np.int32)
        for j, idx in enumerate(send_rows):
            send_index[j, :len(idx)] = idx
        rows_ext = ops.cat([rows, ops.zeros((1, h), rows.dtype)], 0)
        received = self.ep_all_to_all(ops.gather(rows_ext, Tensor(send_index.reshape(-1)), 0).reshape(ep, width, h))
        # group the received rows by my local expert, sources in rank order
        mine = kept_all[:, self.ep_rank * n_local:(self.ep_rank + 1) * n_local]  # (ep src, local experts)
        offsets = np.cumsum(mine, 1) - mine
        grouped = np.concatenate([i * width + offsets[i, e] + np.arange(mine[i, e])
                                  for e in range(n_local) for i in range(ep)]).astype(np.int32)
        flat = received.reshape(ep * width, h)
        y = self.experts(ops.gather(flat, Tensor(grouped), 0), Tensor(mine.sum(0).astype(np.int32)))
        back_index = np.full(ep * width, len(grouped), np.int32)
        back_index[grouped] = np.arange(len(grouped), dtype=np.int32)
        y_ext = ops.cat([y, ops.zeros((1, h), y.dtype)], 0)
        returned = self.ep_all_to_all(ops.gather(y_ext, Tensor(back_index), 0).reshape(ep, width, h))
        row_index = np.full(n, ep * width, np.int32)
        for j, idx in enumerate(send_rows):
            row_index[idx] = j * width + np.arange(len(idx))
        ret_ext = ops.cat([returned.reshape(ep * width, h), ops.zeros((1, h), returned.dtype)], 0)
        expert_out = ops.gather(ret_ext, Tensor(row_index), 0)  # (N, H) in this rank's row order
        keep_row = row_index < ep * width
        slots = slot_rows.asnumpy()
        slots = np.where((slots >= 0) & keep_row[np.maximum(slots, 0)], slots, -1).astype(np.int32)
        out = self.unpermute_combine(expert_out, Tensor(slots), weights)
        return out, experts, Tensor(int(kept.sum()), ms.int32)

    def construct(self, x: Tensor):
        """x (B, S, H) -> (out (B, S, H), (f (E,), P (E,), z-loss, dropped slots)) for this rank's tokens."""
        x = self.entry(x)  # sequence parallel: gather the token shards
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)
        logits = self.router(tokens).astype(ms.float32)  # (T, E)
        if self.dispatcher == "allgather":
            out, experts, kept = self._allgather(tokens, logits)
        elif self.dispatcher == "alltoall":
            out, experts, kept = self._alltoall(tokens, logits)
        else:
            out, experts, kept = self._local(tokens, logits)
        out = out.astype(x.dtype)
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = ops.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared.astype(out.dtype)
        out = self.exit(out.reshape(b, s, h))
        stats_logits = self.tp_share(logits)
        f, p = RouterStats.load_balancing(stats_logits, experts, self.num_experts)
        dropped = b * s * self.top_k - kept
        return out, (f, p, RouterStats.z_loss(stats_logits), dropped)
