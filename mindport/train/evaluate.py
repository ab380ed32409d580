"""Mean next-token loss and perplexity of a model over a prepared data directory."""
from __future__ import annotations

import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor

from mindport.train.data import PackedDataset


@dataclass
class EvalResult:
    loss: float  # mean over every predicted token
    perplexity: float  # exp(loss)
    samples: int
    tokens: int  # predicted tokens (seq_length - 1 per sample)


def evaluate(model, dataset: PackedDataset, batch_size: int = 4, max_samples: int | None = None) -> EvalResult:
    """Samples in file order; every sample has the same length, so the token mean is the mean of
    the per-batch means weighted by batch size."""
    n = len(dataset) if not max_samples else min(max_samples, len(dataset))
    if dataset.index["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"{dataset.directory}: tokenizer vocabulary {dataset.index['vocab_size']} exceeds the "
                         f"model's vocab_size = {model.config.vocab_size}")

    def loss_of(ids, cos, sin, mask):
        logits, router_loss, _ = model.forward(ids, cos, sin, mask)
        return model.loss(logits, router_loss, ids)

    step = loss_of if model.config.is_moe else ms.jit(loss_of)
    total, cache = 0.0, {}
    for start in range(0, n, batch_size):
        ids = np.stack([dataset[i] for i in range(start, min(start + batch_size, n))])
        if ids.shape not in cache:
            cache[ids.shape] = model.prepare(ids)[1:4]
        total += float(step(Tensor(ids), *cache[ids.shape]).asnumpy()) * ids.shape[0]
    loss = total / n
    return EvalResult(loss, math.exp(loss), n, n * (dataset.seq_length - 1))
