"""Mean next-token loss and perplexity of a model over a prepared data directory: the summed
cross-entropy of every supervised target (labels != IGNORE_INDEX) over their count, token-weighted
across batches and data-parallel ranks; packed rows (segments.bin) attend within their sequences.

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
from mindspore import Tensor, ops

from mindport.config import ConfigError
from mindport.constants import IGNORE_INDEX
from mindport.parallel.comm import collectives
from mindport.train.data import PackedDataset
from mindport.train.trainer import next_token_targets


@dataclass
class EvalResult:
    loss: float  # mean over every supervised token (labels != -100; cross-entropy only: no MoE router loss)
    perplexity: float  # exp(loss)
    samples: int
    tokens: int  # supervised tokens predicted (seq_length - 1 per sample for pretraining data)


def require_tensor_and_data_parallel_only(groups, what: str) -> None:
    """Evaluation runs tensor and data parallelism: refuse pipeline stages and context parallelism."""
    for key, group in (("pipeline_stage", groups.pp), ("context_parallel", groups.cp)):
        if group.size > 1:
            raise ConfigError(f"parallel_config: key '{key}' = {group.size}: {what} runs tensor and data "
                              f"parallelism only (merge a pipeline checkpoint with `mindport convert merge`)")


def evaluate(model, dataset: PackedDataset, batch_size: int = 4, max_samples: int | None = None) -> EvalResult:
    """Samples in file order, ``batch_size`` per data-parallel rank and step; packed rows with their
    segment masks."""
    groups = model.groups
    require_tensor_and_data_parallel_only(groups, "`mindport eval`")
    n = len(dataset) if not max_samples else min(max_samples, len(dataset))
    if dataset.index["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"{dataset.directory}: tokenizer vocabulary {dataset.index['vocab_size']} exceeds the "
                         f"model's vocab_size = {model.config.vocab_size}")

    def loss_sum(ids, cos, sin, mask, targets):
        logits, _, _ = model.forward(ids, cos, sin, mask)
        return model.loss_fn.from_targets(logits, targets, ops.ones((), ms.float32))  # the sum: divided by 1

    step = loss_sum if model.config.is_moe else ms.jit(loss_sum)
    data_sum = collectives(groups.dp) if groups.dp.size > 1 else None
    rows = batch_size * groups.dp.size
    mine = slice(groups.dp.rank * batch_size, (groups.dp.rank + 1) * batch_size)
    inputs = model.prepare(np.zeros((batch_size, dataset.seq_length), np.int32))[1:4]
    total, tokens = 0.0, 0
    for start in range(0, n, rows):
        count = min(rows, n - start)
        batch = dataset.batch(range(start, start + count))
        pad = ((0, rows - count), (0, 0))  # padding rows: no segments, every target ignored
        ids = np.pad(batch.input_ids, pad)
        targets = next_token_targets(np.pad(batch.labels, pad, constant_values=IGNORE_INDEX))
        if batch.segment_ids is not None:
            inputs = model.prepare(ids[mine], segment_ids=np.pad(batch.segment_ids, pad)[mine])[1:4]
        loss = step(Tensor(ids[mine]), *inputs, Tensor(targets[mine]))  # this rank's sum
        if data_sum is not None:
            loss = data_sum.all_reduce(loss)
        total += float(loss.asnumpy())
        tokens += int((targets != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError(f"{dataset.directory}: no supervised tokens (every label of the first {n} samples is "
                         f"{IGNORE_INDEX})")
    loss = total / tokens
    return EvalResult(loss, math.exp(loss), n, tokens)
