"""Causal-LM cross-entropy in fp32 with an ignore index (HF convention: labels are shifted
inside), computed from vocab-parallel logits so the full vocabulary is never gathered."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindport.parallel.comm import ReduceFromGroup
from mindport.parallel.layers import VocabParallelCrossEntropy
from mindport.parallel.state import ParallelGroups

IGNORE_INDEX = -100


class CausalLMLoss(nn.Cell):
    """Mean next-token loss over non-ignored positions of all data-parallel ranks.

    logits (B, S, V/tp); labels (B, S), position t predicts labels[t + 1]. Each rank
    divides its summed loss by the global count of counted tokens, so gradients summed
    over data-parallel ranks equal the single-process gradient whatever is ignored where.
    """

    def __init__(self, groups: ParallelGroups, local_vocab: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.token_nll = VocabParallelCrossEntropy(groups, local_vocab)
        self.count_over_dp = ReduceFromGroup(groups.dp)
        self.ignore_index = ignore_index

    def construct(self, logits: Tensor, labels: Tensor) -> Tensor:
        v = logits.shape[-1]
        flat = logits[:, :-1].reshape(-1, v).astype(ms.float32)  # (B*(S-1), V/tp)
        target = labels[:, 1:].reshape(-1).astype(ms.int32)
        valid = (target != self.ignore_index).astype(ms.float32)
        nll = self.token_nll(flat, ops.where(target != self.ignore_index, target, ops.zeros_like(target)))
        count = self.count_over_dp(ops.stop_gradient(valid.sum()))
        return (nll * valid).sum() / ops.maximum(count, ops.ones((), ms.float32))
