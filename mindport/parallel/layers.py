"""Tensor-parallel layers (Megatron-style), sized by the slicing table.

Notation: B batch, S sequence, S/tp a sequence shard (sequence parallel), H hidden,
V vocab, tp = model_parallel.

A transformer block enters its tensor-parallel region once (:func:`region_entry`: identity
forward / all-reduce backward, or with sequence parallelism an all-gather of the sequence
shards), runs column-parallel projections on local heads or ffn columns, and leaves it in
its row-parallel output projection (all-reduce, or reduce-scatter back to sequence shards),
adding the replicated bias after the reduction.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Zero, initializer

from mindport.config import ModelConfig
from mindport.dtypes import dtype_of
from mindport.ops.skinny_matmul import skinny_matmul
from mindport.parallel.comm import (CopyToGroup, GatherFromGroup, GatherToAll, ReduceFromGroup,
                                    ReduceScatterToGroup, collectives)
from mindport.parallel.sharding import vocab_block
from mindport.parallel.state import ParallelGroups

SEQ_AXIS = 1  # hidden states are (B, S, H)


def region_entry(groups: ParallelGroups) -> nn.Cell:
    if groups.sequence_parallel:
        return GatherFromGroup(groups.tp, SEQ_AXIS)
    return CopyToGroup(groups.tp)


def region_exit(groups: ParallelGroups) -> nn.Cell:
    if groups.sequence_parallel:
        return ReduceScatterToGroup(groups.tp, SEQ_AXIS)
    return ReduceFromGroup(groups.tp)


def _dtypes(config: ModelConfig):
    return dtype_of(config.param_dtype), dtype_of(config.compute_dtype)


class LoRAMatrix(nn.Cell):
    """One LoRA factor, a Cell so its parameter is named ``<linear>.lora_A.weight`` as in PEFT."""

    def __init__(self, shape: tuple[int, int], dtype):
        super().__init__()
        self.weight = Parameter(initializer(Zero(), shape, dtype))


class Linear(nn.Cell):
    """y = x W^T (+ b) with W stored (out, in) as in HF checkpoints; local shard sizes given.

    With a LoRA adapter (:meth:`add_lora`) the projection adds s * dropout(x) A^T B^T, A (r, in) and
    B (out, r) local like W: a column-parallel layer's B holds its output rows, a row-parallel
    layer's A its input columns, so the adapter's partial sum joins W's in the same reduction.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: ModelConfig):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        param_dtype, self.compute_dtype = _dtypes(config)
        self.weight = Parameter(initializer(Normal(config.initializer_range), (out_features, in_features), param_dtype))
        self.bias = Parameter(initializer(Zero(), (out_features,), param_dtype)) if bias else None
        self.matmul = skinny_matmul  # x W^T: MatMul, or a weight-streaming C++ loop for a decode step's few rows
        self.lora_A = self.lora_B = None
        self.lora_scaling, self.lora_dropout = 0.0, 0.0

    def add_lora(self, rank: int, scaling: float, dropout: float, prefix: str) -> None:
        """Attach zero A (rank, in) and B (out, rank) named ``prefix.lora_A.weight`` / ``.lora_B.weight``."""
        self.lora_A = LoRAMatrix((rank, self.in_features), self.weight.dtype)
        self.lora_B = LoRAMatrix((self.out_features, rank), self.weight.dtype)
        self.lora_A.weight.name, self.lora_B.weight.name = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        self.lora_scaling, self.lora_dropout = scaling, dropout

    def project(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).astype(self.compute_dtype)
        y = self.matmul(x2d, self.weight.astype(self.compute_dtype))
        if self.lora_A is not None:
            if self.lora_dropout and self.training:
                x2d = ops.dropout(x2d, self.lora_dropout)
            low = self.matmul(x2d, self.lora_A.weight.astype(self.compute_dtype))  # (N, r)
            y = y + self.matmul(low, self.lora_B.weight.astype(self.compute_dtype)) * self.lora_scaling
        return y.reshape(*lead, self.out_features)

    def add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.astype(self.compute_dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.add_bias(self.project(x))


class RowParallelLinear(Linear):
    """Input split over tp (in/tp columns of W); output reduced over tp, then the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: ModelConfig,
                 groups: ParallelGroups):
        super().__init__(in_features // groups.tp.size, out_features, bias, config)
        self.exit = region_exit(groups)

    def construct(self, x: Tensor) -> Tensor:
        return self.add_bias(self.exit(self.project(x)))


def vocab_rows(config: ModelConfig, groups: ParallelGroups) -> tuple[int, int, int]:
    """(first id, real rows, padded rows Vp/tp) of this rank's vocabulary block (sharding.py)."""
    block = vocab_block(config.vocab_size, groups.tp.size, config.vocab_pad_multiple)
    start = groups.tp.rank * block
    return start, min(block, config.vocab_size - start), block


class VocabParallelEmbedding(nn.Cell):
    """Rows [r*Vp/tp, (r+1)*Vp/tp) of the (padded) table on rank r, real rows only; other ids look
    up zeros, then reduce."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        self.start, self.local_vocab, _ = vocab_rows(config, groups)
        param_dtype, self.compute_dtype = _dtypes(config)
        self.weight = Parameter(initializer(Normal(config.initializer_range), (self.local_vocab, config.hidden_size),
                                            param_dtype))
        self.split = groups.tp.size > 1
        self.exit = region_exit(groups)

    def construct(self, input_ids: Tensor) -> Tensor:
        if not self.split:
            return ops.gather(self.weight, input_ids, 0).astype(self.compute_dtype)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.local_vocab)
        rows = ops.gather(self.weight, local * inside.astype(local.dtype), 0)
        rows = rows * ops.expand_dims(inside, -1).astype(rows.dtype)
        return self.exit(rows.astype(self.compute_dtype))


class VocabParallelHead(Linear):
    """LM head (this rank's real vocabulary rows): enters the region, returns vocab-local logits
    (B, S, Vp/tp), the padding columns -inf, so softmax and loss give them probability 0."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        _, rows, block = vocab_rows(config, groups)
        super().__init__(config.hidden_size, rows, False, config)
        self.pad, self.vocab_size = block - rows, config.vocab_size
        self.entry = region_entry(groups)
        self.gather_vocab = GatherToAll(groups.tp, -1)

    def construct(self, x: Tensor) -> Tensor:
        logits = self.project(self.entry(x))
        if self.pad:
            logits = ops.cat([logits, ops.full(logits.shape[:-1] + (self.pad,), float("-inf"), dtype=logits.dtype)], -1)
        return logits

    def full_logits(self, local_logits: Tensor) -> Tensor:
        """The V real logits on every rank (inference): the padding columns never leave the model."""
        logits = self.gather_vocab(local_logits)
        return logits[..., :self.vocab_size] if logits.shape[-1] > self.vocab_size else logits


def log_shifted_sum(sum_exp: Tensor) -> Tensor:
    """log(s) of a sum of exponentials shifted by their maximum (so s >= 1), as log1p(s - 1).

    Exact subtraction below 2**24 and a correctly rounded log1p. MindSpore's fp32 CPU ``Log`` kernel
    approximates on full SIMD chunks and is exact on the remainder, and its thread split (auto-tuned
    over the first launches in a process) decides which elements fall where: its last bit would
    depend on how often the kernel ran before, e.g. differ between a resumed and an uninterrupted run.
    """
    return ops.log1p(sum_exp - 1.0)


class VocabParallelCrossEntropy(nn.Cell):
    """Per-token -log softmax(logits)[target] from vocab-sharded logits; never gathers V.

    logits (N, V/tp) fp32, target (N,) int32 (any id; out-of-shard ids contribute on their
    owner rank). Backward: (softmax - one_hot) restricted to this shard, times dout.
    """

    def __init__(self, groups: ParallelGroups, local_vocab: int):
        super().__init__()
        self.comm = collectives(groups.tp)
        self.size, self.rank = groups.tp.size, groups.tp.rank
        self.start, self.local_vocab = groups.tp.rank * local_vocab, local_vocab

    def _stats(self, logits: Tensor, target: Tensor):
        local_max = logits.max(-1, keepdims=True)  # (N, 1)
        global_max = self.comm.all_gather(local_max, 1).max(-1, keepdims=True)  # MAX from gather (CPU: SUM only)
        shifted = logits - global_max
        sum_exp = self.comm.all_reduce(ops.exp(shifted).sum(-1, keepdims=True))
        local_t = target - self.start
        inside = (local_t >= 0) & (local_t < self.local_vocab)
        safe_t = local_t * inside.astype(local_t.dtype)  # out-of-shard ids -> row 0, masked below
        return shifted, sum_exp, inside, safe_t

    def construct(self, logits: Tensor, target: Tensor) -> Tensor:
        shifted, sum_exp, inside, safe_t = self._stats(logits, target)
        picked = ops.gather_elements(shifted, 1, safe_t.reshape(-1, 1)).reshape(-1) * inside.astype(shifted.dtype)
        return log_shifted_sum(sum_exp.reshape(-1)) - self.comm.all_reduce(picked)

    def bprop(self, logits, target, out, dout):
        shifted, sum_exp, inside, safe_t = self._stats(logits, target)
        softmax = ops.exp(shifted) / sum_exp
        one_hot = ops.one_hot(safe_t, self.local_vocab, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        one_hot = one_hot * ops.expand_dims(inside, -1).astype(ms.float32)
        return (softmax - one_hot) * ops.expand_dims(dout, -1), ops.fill(target.dtype, target.shape, 0)
