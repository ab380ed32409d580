"""Mixture-of-experts feed-forward in four steps: route -> dispatch -> experts -> combine.

Notation: T tokens (B*S), H hidden, E routed experts, I expert width, k experts per token,
N = T*k routing slots.

- route + dispatch: one fused operator (``ops/moe_routing``): fp32 softmax over E router
  logits, top-k (optionally renormalised), and the tokens copied into expert-grouped order.
- experts: SwiGLU per expert over its contiguous block of rows (stacked weights [E, I, H]), as
  three grouped matmuls (``ops/grouped_matmul``) whose group sizes stay on the device: every
  shape is static and nothing is read on the host, so training and decoding compile (``ms.jit``).
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
from typing import NamedTuple

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Zero, initializer

from mindport import dispatch
from mindport.config import ModelConfig
from mindport.dtypes import dtype_of
from mindport.ops import moe_routing  # noqa: F401  (registers the routing backends)
from mindport.ops.grouped_matmul import group_of_rows
from mindport.parallel.comm import AllToAll, GatherFromGroup, ReduceScatterToGroup, ShareGradient, collectives
from mindport.parallel.layers import Linear, log_shifted_sum, region_entry, region_exit
from mindport.parallel.state import ParallelGroups
from mindport.transformer.mlp import SwiGLU


class RouterStats(NamedTuple):
    """One MoE layer's routing statistics for this rank's tokens; the model pools them over
    layers into its auxiliary losses (:meth:`CausalLM.router_loss`) and metrics.

    :class:`MoE` returns them as a plain tuple in this order (``RouterStats(*stats)`` names them):
    a graph cannot build a NamedTuple from custom-operator outputs without falling back to Python.
    """

    fraction: Tensor     # f (E,): fraction of routing slots per expert, summed over the k choices
    probability: Tensor  # P (E,): mean router probability per expert
    z_loss: Tensor       # (): mean squared logsumexp of the router logits
    dropped: Tensor      # (): routing slots dropped over capacity
    tokens: Tensor       # (E,): routing slots per expert, dropped ones and padding included
    # f, P and z average over the tokens that count (padding excluded: MoE's token_mask)


FRACTION, PROBABILITY, Z_LOSS, DROPPED, TOKENS = range(len(RouterStats._fields))  # positions in the stats tuple


def token_mean(x: Tensor, token_mask: Tensor | None) -> Tensor:
    """Mean of x (T, ...) over the tokens that count: ``token_mask`` (T,) is 1 for them and 0 for
    padding (None: all count)."""
    if token_mask is None:
        return x.mean(0)
    weight = token_mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return (x * weight).sum(0) / ops.maximum(weight.sum(), 1.0)


def load_balancing(logits: Tensor, experts: Tensor, num_experts: int,
                   token_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(f, P, slots) of logits (T, E) and chosen experts (T, k): f and P are the means over the
    tokens that count (``token_mask`` (T,), 1 = counts, 0 = padding; None: all), as transformers'
    ``load_balancing_loss_func`` with an attention mask; slots (E,) are every token's routing slots
    per expert. The Switch/Mixtral loss is E * sum(f * P) over pooled layers."""
    probs = ops.softmax(logits.astype(ms.float32), -1)  # (T, E)
    one_hot = ops.one_hot(experts, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))  # (T, k, E)
    chosen = one_hot.sum(1)  # (T, E): how many of the token's k slots went to each expert
    return token_mean(chosen, token_mask), token_mean(probs, token_mask), chosen.sum(0)


def z_loss(logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean squared logsumexp of logits (T, E) over the tokens that count (``token_mask`` as in
    :func:`load_balancing`)."""
    x = logits.astype(ms.float32)
    top = ops.stop_gradient(x.max(-1, keepdims=True))
    lse = top.squeeze(-1) + log_shifted_sum(ops.exp(x - top).sum(-1))  # logsumexp, reproducibly rounded
    return token_mean(ops.square(lse), token_mask)


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
        self.grouped_matmul = dispatch.get("grouped_matmul")
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

        Three grouped matmuls (``ops/grouped_matmul``): static shapes, nothing read on the host.
        """
        dt, matmul = self.compute_dtype, self.grouped_matmul
        gate, up, down = (w.astype(dt) for w in self.expert_weights())
        x = rows.astype(dt)
        return matmul(self.act(matmul(x, gate, counts), matmul(x, up, counts)), down, counts)


class LocalDispatcher(nn.Cell):
    """No expert parallelism: this rank's tokens go to all E experts here.

    ``route`` is the fused operator (``ops/moe_routing``): logits (T, E), tokens (T, H) ->
    (weights (T, k), experts (T, k), rows (N, H) grouped by expert, slot_rows (N,) (-1: dropped),
    counts (E,)).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.moe_top_k
        self.norm_topk_prob, self.norm_eps = config.norm_topk_prob, config.norm_topk_eps
        self.capacity_factor = config.capacity_factor
        self.gating_permute = dispatch.get("moe_gating_permute")
        self.unpermute_combine = dispatch.get("moe_unpermute_combine")

    def capacity(self, num_tokens: int) -> int:
        """Slots each expert keeps of ``num_tokens`` tokens' routing (0: dropless)."""
        if not self.capacity_factor:
            return 0
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(self, logits: Tensor, tokens: Tensor, capacity: int):
        return self.gating_permute(logits, tokens, self.top_k, self.norm_topk_prob, self.norm_eps, capacity)

    def dispatch(self, tokens: Tensor, logits: Tensor):
        """tokens (T, H), logits (T, E) -> (rows (N, H), counts (E,), plan for :meth:`combine`)."""
        weights, experts, rows, slot_rows, counts = self.route(logits, tokens, self.capacity(tokens.shape[0]))
        return rows, counts, (weights, experts, slot_rows, counts)

    def combine(self, expert_out: Tensor, plan) -> tuple[Tensor, Tensor, Tensor]:
        """expert_out (N, H) -> (out (T, H), experts (T, k), kept slots ())."""
        weights, experts, slot_rows, counts = plan
        return self.unpermute_combine(expert_out, slot_rows, weights), experts, counts.sum()


class AllGatherDispatcher(LocalDispatcher):
    """Every rank gathers the ep group's tokens and router logits, routes them all and runs its own
    experts on their rows; a reduce-scatter returns each rank its tokens' summed outputs.

    Static shapes: the N = ep*T*k routed rows are rotated so that this rank's experts' rows come
    first (their start is a device scalar); the grouped matmul leaves the rows past them zero, and
    the inverse rotation puts the outputs back in place.
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__(config)
        local_experts = config.num_experts // groups.ep.size
        self.ep, self.rank = groups.ep.size, groups.ep.rank
        self.first, self.last = self.rank * local_experts, (self.rank + 1) * local_experts  # my experts
        self.gather = GatherFromGroup(groups.ep, 0)
        self.reduce_scatter = ReduceScatterToGroup(groups.ep, 0)

    def dispatch(self, tokens: Tensor, logits: Tensor):
        t = tokens.shape[0]
        all_tokens, all_logits = self.gather(tokens), self.gather(logits)  # (ep*T, H), (ep*T, E)
        weights, experts, rows, slot_rows, counts = self.route(all_logits, all_tokens, self.capacity(t * self.ep))
        n = rows.shape[0]
        before_mine = (ops.arange(self.num_experts, dtype=ms.int32) < self.first).astype(ms.int32)
        start = (counts * before_mine).sum().astype(ms.int32)  # first row of my experts
        positions = ops.arange(n, dtype=ms.int32)
        mine_first = ops.gather(rows, (positions + start) % n, 0)
        plan = (weights, experts, slot_rows, (positions - start + n) % n, t)
        return mine_first, counts[self.first:self.last], plan

    def combine(self, expert_out: Tensor, plan):
        weights, experts, slot_rows, unrotate, t = plan
        partial = self.unpermute_combine(ops.gather(expert_out, unrotate, 0), slot_rows, weights)  # my experts' share
        out = self.reduce_scatter(partial)  # (T, H): summed over ranks, my tokens
        k = self.top_k
        kept = (slot_rows[self.rank * t * k:(self.rank + 1) * t * k] >= 0).astype(ms.int32).sum()
        return out, experts[self.rank * t:(self.rank + 1) * t], kept


class AllToAllDispatcher(LocalDispatcher):
    """Each rank routes its own tokens, exchanges per-expert counts, drops over capacity in the
    group's token order, and one all-to-all sends each row to its expert's rank; a second brings
    the outputs back.

    Static shapes: every rank sends every rank a buffer of :meth:`width` rows, the most one rank
    can send another: N = T*k when dropless (all of a rank's slots may choose one rank's experts),
    min(N, local experts * capacity) with capacity. Each all-to-all thus moves ep x width x H
    values per rank (ep x the routed rows when dropless). The index tables are device tensors:
    ``send_slot`` (N,) places my rows in the send buffers (ep*width: not sent), ``grouped_slot``
    (ep*width,) orders the received rows by my local expert, sources in rank order (ep*width: padding).
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__(config)
        self.ep, self.rank = groups.ep.size, groups.ep.rank
        self.local_experts = config.num_experts // groups.ep.size
        self.comm = collectives(groups.ep)
        self.all_to_all = AllToAll(groups.ep, 0, 0)

    def width(self, num_tokens: int) -> int:
        """Rows of each per-rank send buffer for ``num_tokens`` tokens on this rank (the static bound)."""
        slots, capacity = num_tokens * self.top_k, self.capacity(num_tokens * self.ep)
        return min(slots, self.local_experts * capacity) if capacity else slots

    def dispatch(self, tokens: Tensor, logits: Tensor):
        ep, n_local, rank, e = self.ep, self.local_experts, self.rank, self.num_experts
        t = tokens.shape[0]
        weights, experts, rows, slot_rows, counts = self.route(logits, tokens, 0)  # dropless locally
        n, h, width = rows.shape[0], rows.shape[1], self.width(t)
        all_counts = self.comm.all_gather(counts.reshape(1, e), 0)  # (ep, E)
        capacity = self.capacity(t * ep)
        kept_all = all_counts
        if capacity:  # slots of lower ranks come first in token order
            before = ops.cumsum(all_counts, 0) - all_counts
            kept_all = ops.minimum(ops.maximum(capacity - before, 0), all_counts)
        kept = kept_all[rank]  # (E,)
        # my rows (grouped by expert, every row routed) -> (destination rank, position in its buffer)
        expert = group_of_rows(counts, n)
        start = ops.cumsum(counts, 0) - counts
        within = ops.arange(n, dtype=ms.int32) - ops.gather(start, expert, 0)
        keep_row = within < ops.gather(kept, expert, 0)
        dest = expert // n_local
        kept_before = ops.cumsum(kept, 0) - kept
        position = ops.gather(kept_before, expert, 0) - ops.gather(kept_before, dest * n_local, 0) + within
        send_slot = ops.where(keep_row, dest * width + position, ep * width).astype(ms.int32)
        send_index = _inverse(send_slot, ep * width, n)
        received = self.all_to_all(_gather_rows(rows, send_index).reshape(ep, width, h)).reshape(ep * width, h)
        # received slot i*width + p from source i -> its place among my experts' rows
        mine = kept_all[:, rank * n_local:(rank + 1) * n_local]  # (ep source, local experts)
        source = ops.arange(ep * width, dtype=ms.int32) // width
        p = ops.arange(ep * width, dtype=ms.int32) % width
        from_source = ops.gather(mine, source, 0)  # (ep*width, local experts): the slot's source's rows
        ends = ops.cumsum(from_source, 1)
        local = (p.reshape(-1, 1) >= ends).astype(ms.int32).sum(1).astype(ms.int32)  # n_local: padding
        local_safe = ops.minimum(local, n_local - 1)
        within_src = p - ops.gather_elements(ends - from_source, 1, local_safe.reshape(-1, 1)).reshape(-1)
        per_expert = mine.sum(0).astype(ms.int32)  # (local experts,) rows of each of my experts
        expert_first = ops.cumsum(per_expert, 0) - per_expert
        from_earlier_sources = (ops.cumsum(mine, 0) - mine).reshape(-1)
        grouped = ops.gather(expert_first, local_safe, 0) + \
            ops.gather(from_earlier_sources, source * n_local + local_safe, 0) + within_src
        grouped_slot = ops.where(local < n_local, grouped, ep * width).astype(ms.int32)
        expert_rows = _gather_rows(received, _inverse(grouped_slot, ep * width, ep * width))
        plan = (weights, experts, slot_rows, send_slot, grouped_slot, keep_row, kept.sum())
        return expert_rows, per_expert, plan

    def combine(self, expert_out: Tensor, plan):
        weights, experts, slot_rows, send_slot, grouped_slot, keep_row, kept = plan
        ep, h = self.ep, expert_out.shape[1]
        returned = self.all_to_all(_gather_rows(expert_out, grouped_slot).reshape(ep, -1, h)).reshape(-1, h)
        rows_out = _gather_rows(returned, send_slot)  # (N, H) in this rank's row order, zero if not sent
        sent = (slot_rows >= 0) & ops.gather(keep_row, ops.maximum(slot_rows, 0), 0)
        slots = ops.where(sent, slot_rows, ops.full_like(slot_rows, -1))
        return self.unpermute_combine(rows_out, slots, weights), experts, kept


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (n, H) gathered at ``index``, where index n selects a zero row."""
    x_ext = ops.cat([x, ops.zeros((1, x.shape[1]), x.dtype)], 0)
    return ops.gather(x_ext, index, 0)


def _inverse(slot: Tensor, size: int, missing: int) -> Tensor:
    """(size,) int32: index[slot[i]] = i for every slot[i] < size; ``missing`` where no slot points."""
    table = ops.full((size + 1,), missing, dtype=ms.int32)  # the extra entry takes the unplaced slots
    table = ops.tensor_scatter_update(table, slot.reshape(-1, 1), ops.arange(slot.shape[0], dtype=ms.int32))
    return table[:size]


class MoE(nn.Cell):
    """Router, routed experts (E/ep per expert-parallel rank), optional shared expert.

    The token dispatcher is chosen once, from ``moe_token_dispatcher`` and the ep size
    (:class:`LocalDispatcher` without expert parallelism). Both expert-parallel dispatchers
    (:class:`AllGatherDispatcher`, three collectives a layer, and :class:`AllToAllDispatcher`)
    have the same capacity and drop semantics as one process holding every token of the ep
    group in rank order (capacity counts the group's tokens; a slot keeps its place in token order).
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        h = config.hidden_size
        self.num_experts, self.top_k = config.num_experts, config.moe_top_k
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
        self.token_dispatcher = self._token_dispatcher(config, groups)

    @staticmethod
    def _token_dispatcher(config: ModelConfig, groups: ParallelGroups) -> LocalDispatcher:
        if groups.ep.size == 1:
            return LocalDispatcher(config)
        if groups.config.moe_token_dispatcher == "allgather":
            return AllGatherDispatcher(config, groups)
        return AllToAllDispatcher(config, groups)

    def construct(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, tuple]:
        """x (B, S, H) -> (out (B, S, H), this rank's tokens' :class:`RouterStats` as a tuple);
        ``token_mask`` (B, S): 1 for tokens the balancing statistics f, P and z count, 0 for padding
        (None: every token)."""
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
        counted = None if token_mask is None else token_mask.reshape(b * s)
        f, p, slots = load_balancing(stats_logits, experts, self.num_experts, counted)
        return out, (f, p, z_loss(stats_logits, counted), b * s * self.top_k - kept, slots)
