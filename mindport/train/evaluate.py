"""Mean next-token loss and perplexity of a model over a prepared data directory.

Under data parallelism each rank evaluates its rows of every global batch (``batch_size`` rows
per rank); under tensor parallelism each rank holds a slice of every layer and the
vocabulary-parallel loss. The last global batch is padded with rows whose targets are all
ignored, so every rank runs the same (compiled) shape the same number of times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor

from mindport.config import ConfigError
from mindport.constants import IGNORE_INDEX
from mindport.parallel.comm import collectives
from mindport.train.data import PackedDataset
from mindport.train.trainer import next_token_targets


@dataclass
class EvalResult:
    loss: float  # mean over every predicted token (cross-entropy only: no MoE router loss)
    perplexity: float  # exp(loss)
    samples: int
    tokens: int  # predicted tokens (seq_length - 1 per sample)


def evaluate(model, dataset: PackedDataset, batch_size: int = 4, max_samples: int | None = None) -> EvalResult:
    """Samples in file order, ``batch_size`` per data-parallel rank and step."""
    groups = model.groups
    for key, group in (("pipeline_stage", groups.pp), ("context_parallel", groups.cp)):
        if group.size > 1:
            raise ConfigError(f"parallel_config: key '{key}' = {group.size}: `mindport eval` runs tensor and data "
                              f"parallelism only (merge a pipeline checkpoint with `mindport convert merge`)")
    n = len(dataset) if not max_samples else min(max_samples, len(dataset))
    if dataset.index["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"{dataset.directory}: tokenizer vocabulary {dataset.index['vocab_size']} exceeds the "
                         f"model's vocab_size = {model.config.vocab_size}")

    def loss_of(ids, cos, sin, mask, targets):
        logits, _, _ = model.forward(ids, cos, sin, mask)
        return model.loss_fn.from_targets(logits, targets)

    step = loss_of if model.config.is_moe else ms.jit(loss_of)
    data_sum = collectives(groups.dp) if groups.dp.size > 1 else None
    rows = batch_size * groups.dp.size
    mine = slice(groups.dp.rank * batch_size, (groups.dp.rank + 1) * batch_size)
    inputs = model.prepare(np.zeros((batch_size, dataset.seq_length), np.int32))[1:4]
    total = 0.0
    for start in range(0, n, rows):
        ids = np.zeros((rows, dataset.seq_length), np.int32)
        count = min(rows, n - start)
        ids[:count] = np.stack([dataset[i] for i in range(start, start + count)])
        targets = next_token_targets(ids)
        targets[count:] = IGNORE_INDEX  # padding rows
        loss = step(Tensor(ids[mine]), *inputs, Tensor(targets[mine]))  # this rank's share of the batch mean
        if data_sum is not None:
            loss = data_sum.all_reduce(loss)
        total += float(loss.asnumpy()) * float((targets != IGNORE_INDEX).sum())
    tokens = n * (dataset.seq_length - 1)
    loss = total / tokens
    return EvalResult(loss, math.exp(loss), n, tokens)
