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
from typing import Callable, NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Zero, initializer

from mindport import dispatch
from mindport.config import ModelConfig
from mindport.dtypes import dtype_of
from mindport.ops import moe_routing  # noqa: F401  (registers the routing backends)
from mindport.parallel.comm import AllToAll, GatherFromGroup, ReduceScatterToGroup, ShareGradient, collectives
from mindport.parallel.layers import Linear, log_shifted_sum, region_entry, region_exit
from mindport.parallel.state import ParallelGroups
from mindport.transformer.mlp import SwiGLU


class RouterStats(NamedTuple):
    """One MoE layer's routing statistics for this rank's tokens; the model pools them over
    layers into its auxiliary losses (:meth:`CausalLM.router_loss`) and metrics."""

    fraction: Tensor     # f (E,): fraction of routing slots per expert, summed over the k choices
    probability: Tensor  # P (E,): mean router probability per expert
    z_loss: Tensor       # (): mean squared logsumexp of the router logits
    dropped: Tensor      # (): routing slots dropped over capacity


def load_balancing(logits: Tensor, experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(f, P) of logits (T, E) and chosen experts (T, k); the Switch/Mixtral loss is
    E * sum(f * P) over pooled layers."""
    probs = ops.softmax(logits.astype(ms.float32), -1)  # (T, E)
    one_hot = ops.one_hot(experts, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))  # (T, k, E)
    return one_hot.mean(0).sum(0), probs.mean(0)


def z_loss(logits: Tensor) -> Tensor:
    """Mean squared logsumexp of logits (T, E)."""
    x = logits.astype(ms.float32)
    top = ops.stop_gradient(x.max(-1, keepdims=True))
    lse = top.squeeze(-1) + log_shifted_sum(ops.exp(x - top).sum(-1))  # logsumexp, reproducibly rounded
    return ops.square(lse).mean()


class Experts(nn.Cell):
    """E SwiGLU experts with stacked weights, applied to expert-grouped rows.

    LoRA (:meth:`add_lora`) follows PEFT's ``target_parameters`` on transformers 5's fused experts: each
    expert e has its own A_e, B_e, gate and up share A_e as they share PEFT's fused ``gate_up_proj``,
    and the delta is added to the expert's weights before its matmuls: W_e + s B_e A_e.
    """

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
        self.gate_up_proj_lora_A = self.gate_proj_lora_B = self.up_proj_lora_B = None
        self.down_proj_lora_A = self.down_proj_lora_B = None
        self.lora_scaling = 0.0

    def add_lora(self, rank: int, scaling: float, projections, prefix: str) -> None:
        """Attach zero adapters to ``projections`` ("gate_up_proj", "down_proj"): gate_up_proj_lora_A
        (E, r, H), gate_proj_lora_B and up_proj_lora_B (E, I, r); down_proj_lora_A (E, r, I),
        down_proj_lora_B (E, H, r), named ``prefix.<attribute>``."""
        (e, i, h), dtype = self.gate_proj.shape, self.gate_proj.dtype
        shapes = {"gate_up_proj": {"gate_up_proj_lora_A": (e, rank, h), "gate_proj_lora_B": (e, i, rank),
                                   "up_proj_lora_B": (e, i, rank)},
                  "down_proj": {"down_proj_lora_A": (e, rank, i), "down_proj_lora_B": (e, h, rank)}}
        for projection in projections:
            for attr, shape in shapes[projection].items():
                setattr(self, attr, Parameter(initializer(Zero(), shape, dtype), name=f"{prefix}.{attr}"))
        self.lora_scaling = scaling

    def expert_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The (gate (E, I, H), up (E, I, H), down (E, H, I)) stacks: the parameters, or with adapters
        the adapted stacks W + s B A in the compute dtype."""
        if self.gate_up_proj_lora_A is None and self.down_proj_lora_A is None:
            return self.gate_proj, self.up_proj, self.down_proj
        dt, s = self.compute_dtype, self.lora_scaling
        gate, up, down = (w.astype(dt) for w in (self.gate_proj, self.up_proj, self.down_proj))
        if self.gate_up_proj_lora_A is not None:
            a = self.gate_up_proj_lora_A.astype(dt)  # (E, r, H)
            gate = gate + ops.matmul(self.gate_proj_lora_B.astype(dt), a) * s
            up = up + ops.matmul(self.up_proj_lora_B.astype(dt), a) * s
        if self.down_proj_lora_A is not None:
            down = down + ops.matmul(self.down_proj_lora_B.astype(dt), self.down_proj_lora_A.astype(dt)) * s
        return gate, up, down

    def construct(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows (N, H) grouped by expert, counts (E,) -> (N, H); rows past sum(counts) stay zero.

        Expert block sizes are read on the host, so this runs in PYNATIVE mode.
        """
        sizes = [int(c) for c in counts.asnumpy()]
        gate, up, down = self.expert_weights()
        outs, start = [], 0
        dt = self.compute_dtype
        for e, size in enumerate(sizes):
            if size == 0:
                continue
            x = rows[start:start + size].astype(dt)  # (n_e, H)
            hidden = self.act(ops.matmul(x, gate[e].astype(dt).T), ops.matmul(x, up[e].astype(dt).T))
            outs.append(ops.matmul(hidden, down[e].astype(dt).T))
            start += size
        if start < rows.shape[0]:
            outs.append(ops.zeros((rows.shape[0] - start, rows.shape[1]), dt))
        return ops.cat(outs, 0)


Route = Callable[[Tensor, Tensor, int], tuple]
"""``route(logits (T, E), tokens (T, H), capacity)`` -> (weights (T, k), experts (T, k),
rows (N, H) grouped by expert, slot_rows (N,) (-1: dropped), counts (E,)): the fused operator."""


class LocalDispatcher:
    """No expert parallelism: this rank's tokens go to all E experts here."""

    def __init__(self, route: Route, combine: Callable, capacity: Callable[[int], int]):
        self.route, self.unpermute_combine, self.capacity = route, combine, capacity

    def dispatch(self, tokens: Tensor, logits: Tensor):
        """tokens (T, H), logits (T, E) -> (rows (N, H), counts (E,), plan for :meth:`combine`)."""
        weights, experts, rows, slot_rows, counts = self.route(logits, tokens, self.capacity(tokens.shape[0]))
        return rows, counts, (weights, experts, slot_rows, counts)

    def combine(self, expert_out: Tensor, plan) -> tuple[Tensor, Tensor, Tensor]:
        """expert_out (N, H) -> (out (T, H), experts (T, k), kept slots ())."""
        weights, experts, slot_rows, counts = plan
        return self.unpermute_combine(expert_out, slot_rows, weights), experts, counts.sum()


class AllGatherDispatcher(LocalDispatcher):
    """Every rank gathers the ep group's tokens, routes them all and runs its own experts on
    their rows; a reduce-scatter returns each rank its tokens' summed outputs."""

    def __init__(self, route: Route, combine: Callable, capacity: Callable[[int], int], router: nn.Cell,
                 groups: ParallelGroups, local_experts: int, top_k: int):
        super().__init__(route, combine, capacity)
        self.router, self.top_k = router, top_k
        self.ep, self.rank = groups.ep.size, groups.ep.rank
        self.first, self.last = self.rank * local_experts, (self.rank + 1) * local_experts  # my experts
        self.gather = GatherFromGroup(groups.ep, 0)
        self.reduce_scatter = ReduceScatterToGroup(groups.ep, 0)

    def dispatch(self, tokens: Tensor, logits: Tensor):
        t = tokens.shape[0]
        all_tokens = self.gather(tokens)  # (ep*T, H)
        all_logits = self.router(all_tokens).astype(ms.float32)
        weights, experts, rows, slot_rows, counts = self.route(all_logits, all_tokens, self.capacity(t * self.ep))
        sizes = counts.asnumpy()
        start, mine = int(sizes[:self.first].sum()), int(sizes[self.first:self.last].sum())
        plan = (weights, experts, slot_rows, rows.shape[0], start, mine, t)
        return rows[start:start + mine], counts[self.first:self.last], plan  # my experts' rows only

    def combine(self, expert_out: Tensor, plan):
        weights, experts, slot_rows, n, start, mine, t = plan
        h = expert_out.shape[1]
        parts = [p for p, size in ((ops.zeros((start, h), expert_out.dtype), start), (expert_out, mine),
                                   (ops.zeros((n - start - mine, h), expert_out.dtype), n - start - mine)) if size]
        partial = self.unpermute_combine(ops.cat(parts, 0), slot_rows, weights)  # (ep*T, H): my experts' share
        out = self.reduce_scatter(partial)  # summed over ranks, my tokens
        k = self.top_k
        kept = (slot_rows[self.rank * t * k:(self.rank + 1) * t * k] >= 0).astype(ms.int32).sum()
        return out, experts[self.rank * t:(self.rank + 1) * t], kept


class AllToAllDispatcher(LocalDispatcher):
    """Each rank routes its own tokens, exchanges per-expert counts, drops over capacity in the
    group's token order, and one all-to-all sends each row to its expert's rank (padded to the
    largest block); a second brings the outputs back.

    Index tables (host numpy): ``send_rows[j]`` are my rows for rank j's experts; ``grouped``
    orders the received (ep, width) rows by my local expert, sources in rank order.
    """

    def __init__(self, route: Route, combine: Callable, capacity: Callable[[int], int],
                 groups: ParallelGroups, local_experts: int):
        super().__init__(route, combine, capacity)
        self.ep, self.rank, self.local_experts = groups.ep.size, groups.ep.rank, local_experts
        self.comm = collectives(groups.ep)
        self.all_to_all = AllToAll(groups.ep, 0, 0)

    def dispatch(self, tokens: Tensor, logits: Tensor):
        ep, n_local, rank = self.ep, self.local_experts, self.rank
        weights, experts, rows, slot_rows, counts = self.route(logits, tokens, 0)  # dropless locally
        n, h = rows.shape
        all_counts = self.comm.all_gather(ops.expand_dims(counts, 0), 0).asnumpy().astype(np.int64)  # (ep, E)
        capacity = self.capacity(tokens.shape[0] * ep)
        if capacity:  # slots of lower ranks come first in token order
            before = np.cumsum(all_counts, 0) - all_counts
            kept_all = np.clip(capacity - before, 0, all_counts)
        else:
            kept_all = all_counts
        kept = kept_all[rank]
        block = np.cumsum(all_counts[rank]) - all_counts[rank]
        send_rows = [np.concatenate([np.arange(block[e], block[e] + kept[e]) for e in range(j * n_local, (j + 1) * n_local)])
                     for j in range(ep)]
        width = max(1, int(max(kept_all[i, j * n_local:(j + 1) * n_local].sum() for i in range(ep) for j in range(ep))))
        send_index = np.full((ep, width), n, np.int32)  # n: an appended zero row
        for j, idx in enumerate(send_rows):
            send_index[j, :len(idx)] = idx
        received = self.all_to_all(_gather_rows(rows, send_index.reshape(-1)).reshape(ep, width, h))
        mine = kept_all[:, rank * n_local:(rank + 1) * n_local]  # (ep src, local experts)
        offsets = np.cumsum(mine, 1) - mine
        grouped = np.concatenate([i * width + offsets[i, e] + np.arange(mine[i, e])
                                  for e in range(n_local) for i in range(ep)]).astype(np.int32)
        expert_rows = ops.gather(received.reshape(ep * width, h), Tensor(grouped), 0)
        plan = (weights, experts, slot_rows, send_rows, width, grouped, n, int(kept.sum()))
        return expert_rows, Tensor(mine.sum(0).astype(np.int32)), plan

    def combine(self, expert_out: Tensor, plan):
        weights, experts, slot_rows, send_rows, width, grouped, n, kept = plan
        ep, h = self.ep, expert_out.shape[1]
        back_index = np.full(ep * width, len(grouped), np.int32)
        back_index[grouped] = np.arange(len(grouped), dtype=np.int32)
        returned = self.all_to_all(_gather_rows(expert_out, back_index).reshape(ep, width, h))
        row_index = np.full(n, ep * width, np.int32)
        for j, idx in enumerate(send_rows):
            row_index[idx] = j * width + np.arange(len(idx))
        rows_out = _gather_rows(returned.reshape(ep * width, h), row_index)  # (N, H) in this rank's row order
        keep_row = row_index < ep * width
        slots = slot_rows.asnumpy()
        slots = np.where((slots >= 0) & keep_row[np.maximum(slots, 0)], slots, -1).astype(np.int32)
        return self.unpermute_combine(rows_out, Tensor(slots), weights), experts, Tensor(kept, ms.int32)


def _gather_rows(x: Tensor, index: np.ndarray) -> Tensor:
    """x (n, H) gathered at ``index``, where index n selects a zero row."""
    x_ext = ops.cat([x, ops.zeros((1, x.shape[1]), x.dtype)], 0)
    return ops.gather(x_ext, Tensor(index), 0)


class MoE(nn.Cell):
    """Router, routed experts (E/ep per expert-parallel rank), optional shared expert.

    The token dispatcher is chosen once, from ``moe_token_dispatcher`` and the ep size
    (:class:`LocalDispatcher` without expert parallelism). Both expert-parallel dispatchers
    (:class:`AllGatherDispatcher`, two collectives a layer, and :class:`AllToAllDispatcher`)
    have the same capacity and drop semantics as one process holding every token of the ep
    group in rank order (capacity counts the group's tokens; a slot keeps its place in token order).
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
        self.token_dispatcher = self._token_dispatcher(groups)

    def _token_dispatcher(self, groups: ParallelGroups) -> LocalDispatcher:
        common = (self.route, self.unpermute_combine, self.capacity)
        local_experts = self.num_experts // groups.ep.size
        if groups.ep.size == 1:
            return LocalDispatcher(*common)
        if groups.config.moe_token_dispatcher == "allgather":
            return AllGatherDispatcher(*common, self.router, groups, local_experts, self.top_k)
        return AllToAllDispatcher(*common, groups, local_experts)

    def capacity(self, num_tokens: int) -> int:
        if not self.capacity_factor:
            return 0
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(self, logits: Tensor, tokens: Tensor, capacity: int):
        """See :data:`Route`."""
        return self.gating_permute(logits, tokens, self.top_k, self.norm_topk_prob, self.norm_eps, capacity)

    def construct(self, x: Tensor) -> tuple[Tensor, RouterStats]:
        """x (B, S, H) -> (out (B, S, H), this rank's tokens' :class:`RouterStats`)."""
        x = self.entry(x)  # sequence parallel: gather the token shards
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)
        logits = self.router(tokens).astype(ms.float32)  # (T, E)
        rows, counts, plan = self.token_dispatcher.dispatch(tokens, logits)
        out, experts, kept = self.token_dispatcher.combine(self.experts(rows, counts), plan)
        out = out.astype(x.dtype)
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = ops.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared.astype(out.dtype)
        out = self.exit(out.reshape(b, s, h))
        stats_logits = self.tp_share(logits)
        f, p = load_balancing(stats_logits, experts, self.num_experts)
        return out, RouterStats(f, p, z_loss(stats_logits), b * s * self.top_k - kept)
