"""Causal-LM cross-entropy in fp32 with an ignore index (HF convention: labels are shifted inside)."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

IGNORE_INDEX = -100


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token loss. logits (B, S, V); labels (B, S), position t predicts labels[t + 1]."""
    v = logits.shape[-1]
    logits = logits[:, :-1].reshape(-1, v).astype(ms.float32)  # (B*(S-1), V)
    target = labels[:, 1:].reshape(-1)
    valid = target != ignore_index
    safe_target = ops.where(valid, target, ops.zeros_like(target))
    logz = ops.logsumexp(logits, -1)
    picked = ops.gather_elements(logits, 1, safe_target.reshape(-1, 1).astype(ms.int32)).reshape(-1)
    nll = (logz - picked) * valid.astype(ms.float32)
    return nll.sum() / ops.maximum(valid.astype(ms.float32).sum(), ops.ones((), ms.float32))
