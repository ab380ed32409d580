"""Context parallelism: the zigzag sequence layout, ring attention and all-gather attention.

Layout (zigzag, for causal load balance). A sequence of S tokens is cut into 2*cp chunks of
C = S / (2 cp) tokens; context-parallel rank r holds chunk r followed by chunk 2cp-1-r, so its
local sequence (S_local = 2C tokens) has increasing global positions:

    cp = 2, S = 8:   rank 0: positions 0 1 | 6 7      rank 1: positions 2 3 | 4 5

Every rank then does the same causal work. RoPE (TeleChat2's NTK from the total length S),
targets and the loss use the true global positions (:func:`context_parallel_batch`).

Attention on a rank: queries q (B, N, 2C, D) against the keys/values of every rank, kv heads only
(B, Nkv, 2C, D). Between the rank's query chunks {r, 2cp-1-r} and the key chunks {j, 2cp-1-j} of
rank j, causality leaves exactly one block of work per pair of ranks:

    j == r   all 2C queries vs all 2C keys, causal (the local positions increase, so the
             diagonal mask of the local sequence is the global one)
    j <  r   all 2C queries vs key chunk j (C keys), full
    j >  r   query chunk 2cp-1-r (C queries) vs all 2C keys, full

and every other chunk pair is skipped (its keys lie in the queries' future). Each block is one
call of ``mindport.ops.ring_attention.block_attention`` (output + log-sum-exp), merged into the
running result with ``lse_merge`` (stable: shifted by the larger lse).

Algorithms (``parallel_config.context_parallel_algo``):

- ``ring``: K/V travel around the cp ring one hop per step (cp - 1 hops), the next hop in
  flight while the current block is computed. The backward pass is a ring too (custom bprop):
  K/V travel again with their dK/dV accumulators, each rank adds its blocks' shares (computed
  from the saved merged output and lse, no forward recomputation of the merge) and after cp hops
  dK/dV are home. A rank holds at most two K/V blocks (its own and the travelling one) and one
  block of scores inside the kernel: never the full-sequence K/V or scores.
- ``all_gather`` (Llama-3 style): all-gather K/V (kv heads) over cp, then each local query chunk
  a attends the keys of chunks 0..a as one causal block (bottom-right aligned diagonal). Backward by
  automatic differentiation (all-gather's dual is reduce-scatter). Materialises the full-sequence
  K/V by design; less latency-bound than the ring for short sequences.

Point-to-point transport (:func:`ring_exchange`):

- ``PairRing`` (executed on CPU; also the graph-mode path on devices): a hop is two 2-rank
  AllReduce(SUM)s, over the pair groups (r, r+1) and (r-1, r), where the receiver contributes
  zeros (AllReduce over sub-groups is the only collective MindSpore runs on CPU). Even ranks send
  first, odd ranks receive first, so the pairwise collectives never wait in a cycle. Exact; only
  one K/V block is on the wire per hop.
- ``P2PRing`` (Ascend/GPU, PYNATIVE): ``mindspore.mint.distributed.batch_isend_irecv`` of one
  isend to the next rank and one irecv from the previous one, started before the block is
  computed and waited after (communication overlaps compute). UNEXECUTED: no device was
  available; written from the MindSpore 2.10 API documentation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from mindport.config import ConfigError, ModelConfig
from mindport.constants import IGNORE_INDEX
from mindport.ops import ring_attention as ra
from mindport.parallel import state
from mindport.parallel.comm import GatherFromGroup
from mindport.parallel.state import Group, ParallelGroups


# ------------------------------------------------------------------------------ zigzag layout
def check_sequence_length(seq_len: int, cp: int) -> int:
    """The chunk length S / (2 cp); a ConfigError when S is not a multiple of 2 * cp."""
    if cp > 1 and (seq_len <= 0 or seq_len % (2 * cp)):
        raise ConfigError(
            f"sequence length {seq_len} is not a multiple of 2 x context_parallel = {2 * cp}: the zigzag layout "
            f"cuts each sequence into {2 * cp} equal chunks (pad or change seq_length)")
    return seq_len // (2 * cp)


def zigzag_positions(seq_len: int, cp: int, rank: int) -> np.ndarray:
    """Global positions (2C,) held by context-parallel ``rank``: chunk rank, then chunk 2cp-1-rank."""
    c = check_sequence_length(seq_len, cp)
    if cp == 1:
        return np.arange(seq_len)
    mirror = 2 * cp - 1 - rank
    return np.concatenate([np.arange(rank * c, (rank + 1) * c), np.arange(mirror * c, (mirror + 1) * c)])


def zigzag_split(x: np.ndarray, cp: int, rank: int, axis: int = 1) -> np.ndarray:
    """This rank's two chunks of ``x`` along ``axis`` (the sequence axis)."""
    return np.take(np.asarray(x), zigzag_positions(np.shape(x)[axis], cp, rank), axis=axis)


def zigzag_merge(parts: list[np.ndarray], axis: int = 1) -> np.ndarray:
    """Inverse of :func:`zigzag_split`: the full sequence from every rank's part, in rank order."""
    cp = len(parts)
    seq_len = sum(np.shape(p)[axis] for p in parts)
    order = np.concatenate([zigzag_positions(seq_len, cp, r) for r in range(cp)])
    out = np.empty_like(np.concatenate(parts, axis=axis))
    index = [slice(None)] * out.ndim
    index[axis] = order
    out[tuple(index)] = np.concatenate(parts, axis=axis)
    return out


@dataclass(frozen=True)
class ZigzagBatch:
    """One rank's share of a batch under context parallelism.

    ids (B, 2C) token ids; targets (B, 2C): the token after each global position (-100 at the
    end of the sequence and where the labels are ignored); positions (B, 2C) global positions;
    total_len S (TeleChat2's NTK scaling uses it).
    """

    ids: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    total_len: int

    def model_inputs(self, model):
        """(ids, cos, sin, mask, q_scale) for ``model.forward``: RoPE at the global positions."""
        return model.prepare(self.ids, position_ids=self.positions, total_len=self.total_len)


def context_parallel_batch(input_ids, cp: int, rank: int, labels=None,
                           ignore_index: int = IGNORE_INDEX) -> ZigzagBatch:
    """The data path of a context-parallel step: cut a global batch (B, S) into this rank's zigzag share.

    ``labels`` (B, S) in the HF convention (position t predicts labels[t + 1]; default: the ids);
    the targets are shifted on the full sequence *before* the split, since the next token of a
    chunk lives on another rank. Use with ``model.loss_from_targets``. Raises ConfigError before
    any work when S is not a multiple of 2 * cp.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: shape {ids.shape}: expected (batch, seq_len)")
    b, s = ids.shape
    check_sequence_length(s, cp)
    lab = ids if labels is None else np.asarray(labels)
    if lab.shape != ids.shape:
        raise ValueError(f"labels: shape {lab.shape}: expected {ids.shape}")
    targets = np.full_like(lab, ignore_index)
    targets[:, :-1] = lab[:, 1:]
    pos = zigzag_positions(s, cp, rank)
    return ZigzagBatch(ids[:, pos], targets[:, pos], np.broadcast_to(pos, (b, pos.size)).copy(), s)


# ------------------------------------------------------------------------------ ring transport
class PairRing:
    """Ring hop from 2-rank AllReduce(SUM) (receiver adds zeros). Executed on CPU under msrun.

    ``start(x)`` sends ``x`` to the next rank and returns what the previous rank sent;
    ``wait`` is the identity (the hop is synchronous).
    """

    def __init__(self, group: Group):
        n, r = group.size, group.rank
        self.even = r % 2 == 0
        me, nxt, prv = group.ranks[r], group.ranks[(r + 1) % n], group.ranks[(r - 1) % n]
        if n == 2:  # both hops use the cp group itself, in the same order on both ranks
            send_name = recv_name = group.name
        else:
            send_name, recv_name = f"{group.name}-hop-{me}-{nxt}", f"{group.name}-hop-{prv}-{me}"
            # creation may synchronise the two members: same even/odd order as the hops
            pairs = [(send_name, [me, nxt]), (recv_name, [prv, me])]
            for name, ranks in (pairs if self.even else pairs[::-1]):
                state.ensure_group(name, ranks)
        self.send = ops.AllReduce(group=send_name)
        self.recv = ops.AllReduce(group=recv_name)

    def start(self, x: Tensor) -> Tensor:
        # zeros computed from x: constant zeros would let a graph compiler fold two receives of equal
        # shape into one (common-subexpression elimination); K/V are finite, so x * 0 is exactly 0
        zeros = x * 0
        if self.even:
            sent = self.send(x)
            got = self.recv(ops.depend(zeros, sent))
        else:
            got = self.recv(zeros)
            sent = self.send(ops.depend(x, got))
        return ops.depend(got, sent)

    def wait(self, pending: Tensor) -> Tensor:
        return pending


class P2PRing:
    """Ring hop with asynchronous isend/irecv (Ascend/GPU, PYNATIVE). UNEXECUTED.

    ``start`` posts the isend to the next rank and the irecv from the previous one and returns at
    once; ``wait`` blocks on the handle and returns the received tensor.
    """

    def __init__(self, group: Group):
        n, r = group.size, group.rank
        self.group_name = group.name
        self.next, self.prev = group.ranks[(r + 1) % n], group.ranks[(r - 1) % n]  # global ranks

    def start(self, x: Tensor):
        from mindspore.mint.distributed import P2POp, batch_isend_irecv

        buf = ops.zeros_like(x)
        handles = batch_isend_irecv([P2POp("isend", x, self.next, self.group_name),
                                     P2POp("irecv", buf, self.prev, self.group_name)])
        return buf, handles[0]

    def wait(self, pending) -> Tensor:
        buf, handle = pending
        handle.wait()
        return buf


def ring_exchange(group: Group):
    """The ring transport for this device and mode (see the module docstring)."""
    on_cpu = ms.get_context("device_target") == "CPU"
    if on_cpu or ms.get_context("mode") == ms.GRAPH_MODE:
        return PairRing(group)
    return P2PRing(group)


# ------------------------------------------------------------------------------ attention
def _halves(x: Tensor, c: int) -> tuple[Tensor, Tensor]:
    return x[:, :, :c], x[:, :, c:]


class RingAttention(nn.Cell):
    """Zigzag ring attention over ``group``: (q, k, v) -> (out, lse); forward and backward are rings.

    q (B, N, 2C, D); k, v (B, Nkv, 2C, D) in this rank's zigzag layout; out like q, lse (B, N, 2C)
    float32. ``bprop`` replaces automatic differentiation, so nothing of the forward's hops is kept.
    """

    def __init__(self, group: Group, scale: float):
        super().__init__()
        self.n, self.r, self.scale = group.size, group.rank, scale
        self.ring = ring_exchange(group) if group.size > 1 else None

    def construct(self, q, k, v):
        n, r, c, nkv, scale = self.n, self.r, q.shape[2] // 2, k.shape[1], self.scale
        kv = ops.cat((k, v), 1)  # (B, 2Nkv, 2C, D): one message per hop
        pending = self.ring.start(kv) if n > 1 else None
        out, lse = ra.block_attention(q, k, v, scale, True)  # j == r: the diagonal block
        for i in range(1, n):
            kv = self.ring.wait(pending)  # K/V of rank j = r - i
            if i + 1 < n:
                pending = self.ring.start(kv)  # the next hop travels while this block is computed
            kb, vb = kv[:, :nkv], kv[:, nkv:]
            if (r - i) % n < r:  # all queries vs key chunk j
                o_i, l_i = ra.block_attention(q, kb[:, :, :c], vb[:, :, :c], scale, False)
                out, lse = ra.lse_merge(out, lse, o_i, l_i)
            else:  # query chunk 2cp-1-r vs both key chunks
                o_i, l_i = ra.block_attention(q[:, :, c:], kb, vb, scale, False)
                o_lo, o_hi = _halves(out, c)
                l_lo, l_hi = _halves(lse, c)
                o_hi, l_hi = ra.lse_merge(o_hi, l_hi, o_i, l_i)
                out, lse = ops.cat((o_lo, o_hi), 2), ops.cat((l_lo, l_hi), 2)
        return out, lse

    def bprop(self, q, k, v, out, dout):
        n, r, c, nkv, scale = self.n, self.r, q.shape[2] // 2, k.shape[1], self.scale
        o, lse = out
        do, dl = dout
        dq, dk, dv = ra.block_attention_grad(q, k, v, o, lse, do, dl, scale, True)
        dq = dq.astype(ms.float32)
        dkv = ops.cat((dk, dv), 1).astype(ms.float32)  # travels with its K/V block, back home at the end
        kv = ops.cat((k, v), 1)
        pending = self.ring.start(kv) if n > 1 else None
        for i in range(1, n):
            kv = self.ring.wait(pending)
            if i + 1 < n:
                pending = self.ring.start(kv)
            # the accumulator of the block just received; hops are chained (ops.depend) so that a
            # graph compiler cannot reorder them differently on different ranks
            dkv = self.ring.wait(self.ring.start(ops.depend(dkv, pending if i + 1 < n else kv)))
            if i + 1 < n:
                pending = _after(pending, dkv)
            kb, vb = kv[:, :nkv], kv[:, nkv:]
            if (r - i) % n < r:
                gq, gk, gv = ra.block_attention_grad(q, kb[:, :, :c], vb[:, :, :c], o, lse, do, dl, scale, False)
                dq = dq + gq.astype(ms.float32)
                d_lo, d_hi = _halves(dkv, c)
                dkv = ops.cat((d_lo + ops.cat((gk, gv), 1).astype(ms.float32), d_hi), 2)
            else:
                hi = slice(c, None)
                gq, gk, gv = ra.block_attention_grad(q[:, :, hi], kb, vb, o[:, :, hi], lse[:, :, hi], do[:, :, hi],
                                                     dl[:, :, hi], scale, False)
                d_lo, d_hi = _halves(dq, c)
                dq = ops.cat((d_lo, d_hi + gq.astype(ms.float32)), 2)
                dkv = dkv + ops.cat((gk, gv), 1).astype(ms.float32)
        if n > 1:
            dkv = self.ring.wait(self.ring.start(dkv))  # last hop: dK/dV of this rank's own block
        return dq.astype(q.dtype), dkv[:, :nkv].astype(k.dtype), dkv[:, nkv:].astype(v.dtype)


def _after(pending, tensor):
    """``pending`` (a received tensor, or a (buffer, handle) pair) ordered after ``tensor``."""
    if isinstance(pending, tuple):
        return pending
    return ops.depend(pending, tensor)


class AllGatherAttention(nn.Cell):
    """All-gather K/V over ``group``, then each local query chunk attends its causal prefix (one block)."""

    def __init__(self, group: Group, scale: float):
        super().__init__()
        self.n, self.r, self.scale = group.size, group.rank, scale
        self.gather = GatherFromGroup(group, axis=2)  # backward: reduce-scatter

    def construct(self, q, k, v):
        n, r, c, nkv = self.n, self.r, q.shape[2] // 2, k.shape[1]
        everyone = self.gather(ops.cat((k, v), 1))  # (B, 2Nkv, 2C*cp, D): rank j's chunks j, 2cp-1-j
        chunks = [None] * (2 * n)
        for j in range(n):
            chunks[j] = everyone[:, :, 2 * j * c:(2 * j + 1) * c]
            chunks[2 * n - 1 - j] = everyone[:, :, (2 * j + 1) * c:(2 * j + 2) * c]
        outs = []
        for a, qa in ((r, q[:, :, :c]), (2 * n - 1 - r, q[:, :, c:])):
            prefix = ops.cat(chunks[:a + 1], 2) if a > 0 else chunks[0]  # keys of chunks 0..a
            o_a, _ = ra.block_attention(qa, prefix[:, :nkv], prefix[:, nkv:], self.scale, True)
            outs.append(o_a)
        return ops.cat(outs, 2)


class ContextParallelAttention(nn.Cell):
    """The attention core under context parallelism: ``(q, k, v, mask, scale) -> out``.

    q (B, N, 2C, D) after RoPE, k/v (B, Nkv, 2C, D) (kv heads only), in the zigzag layout of this
    cp rank; ``mask`` is ignored (causality follows from the layout); out (B, N, 2C, D).
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.algo = groups.config.context_parallel_algo
        if self.algo == "ring":
            self.core = RingAttention(groups.cp, self.scale)
        elif self.algo == "all_gather":
            self.core = AllGatherAttention(groups.cp, self.scale)
        else:
            raise ConfigError(f"parallel_config: key 'context_parallel_algo' = {self.algo!r}: "
                              "expected 'ring' or 'all_gather'")

    def construct(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        _check_call(q.shape[2], scale, self.scale)
        if self.algo == "ring":
            out, _ = self.core(q, k, v)
            return out
        return self.core(q, k, v)


@ms.ops.constexpr
def _check_call(local_len, scale, expected_scale):
    if local_len % 2:
        raise ValueError(f"context-parallel attention: local sequence length {local_len} is odd; expected two "
                         "equal zigzag chunks (see mindport.parallel.context.context_parallel_batch)")
    if abs(scale - expected_scale) > 1e-12 * expected_scale:
        raise ValueError(f"context-parallel attention: scale {scale} differs from 1/sqrt(head_dim) = {expected_scale}")
    return True
