"""The one place model outputs become benchmark numbers: log-likelihoods of continuations, of whole
sequences, and greedy generations, batched, under tensor and data parallelism.

Notation: B rows per batch, S the padded input width, C the padded continuation width, V the vocabulary,
W the model's window (``max_position_embeddings``).

A log-likelihood request (context, continuation) runs as lm-eval's hf backend runs it: the input is
``(context + continuation)[-(W + 1):][:-1]`` (cut from the left to the window), and the continuation's
tokens are predicted by the last ``len(continuation)`` positions. Rows are left-padded (the attention
mask hides the padding and RoPE positions count real tokens, so a row scores as it would alone), which
puts every continuation at the right edge: only the last C positions' logits are gathered to the full
vocabulary and normalised, (B, C, V) instead of (B, S, V) (the head itself still runs over all S
positions, (B, S, V/tp)). Requests are sorted by length; S and C are rounded up to powers of two and
short batches are filled with empty rows, so compiled shapes repeat.

Under tensor parallelism every rank runs every batch and returns the same list. Under data
parallelism rank r of the dp group takes requests r, r + dp, ... of the sorted order and the results
are summed over the dp group into every rank's list (float64 values travel as two float32 parts,
so they arrive bit for bit).
"""
from __future__ import annotations

import sys
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from mindport.parallel.comm import collectives
from mindport.train.evaluate import require_tensor_and_data_parallel_only

MIN_WIDTH = 16  # smallest padded input width


def _bucket(n: int, cap: int, least: int = 1) -> int:
    """``n`` rounded up to a power of two (at least ``least``), at most ``cap``."""
    return min(cap, max(least, 1 << max(n - 1, 0).bit_length()))


def _progress_bar(total: int, enabled: bool, unit: str):
    """A tqdm bar on stderr when ``enabled`` (callers enable it on global rank 0 only), else a silent one."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)


def _my_share(model, count: int) -> range:
    """Indices (into a length-sorted order) this data-parallel rank processes."""
    dp = model.groups.dp
    return range(dp.rank, count, dp.size)


def _sum_over_dp(model, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over the dp group of a float64 array in which each rank filled only its own
    entries (zeros elsewhere); exact: each value travels as float32 high and low parts."""
    if model.groups.dp.size == 1:
        return values
    high = values.astype(np.float32)
    low = (values - high.astype(np.float64)).astype(np.float32)
    summed = collectives(model.groups.dp).all_reduce(Tensor(np.stack([high, low])))
    parts = summed.asnumpy().astype(np.float64)
    return parts[0] + parts[1]


def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """Per (context_ids, continuation_ids): the summed log-probability of the continuation given the context, and
    whether every continuation token is the argmax (lm-eval's `is_greedy`). Contexts longer than the model's
    window are cut from the left (as lm-eval's hf backend does). Batched, sorted by length, padded to length
    buckets so compiled shapes repeat; results in request order. Under tensor parallelism every rank returns
    the same list; under data parallelism the requests are split over dp ranks and the results gathered."""
    require_tensor_and_data_parallel_only(model.groups, "evaluation")
    if batch_size <= 0:
        raise ValueError(f"batch_size = {batch_size}: expected a positive integer")
    if not requests:
        return []
    window = model.config.max_position_embeddings
    rows = []  # (input ids, continuation ids)
    for i, (context, continuation) in enumerate(requests):
        context, continuation = [int(t) for t in context], [int(t) for t in continuation]
        if not context or not continuation:
            raise ValueError(f"request {i}: context of {len(context)} and continuation of {len(continuation)} "
                             f"tokens: expected at least one token each (a BOS/prefix token as context)")
        if len(continuation) > window:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens: expected at most the "
                             f"model's window, max_position_embeddings = {window}")
        whole = (context + continuation)[-(window + 1):]
        rows.append((whole[:-1], continuation))
    vocab = model.config.vocab_size
    for i, (ids, continuation) in enumerate(rows):
        bad = [t for t in ids + continuation if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {i}: token id {bad[0]}: expected 0 <= id < vocab_size = {vocab}")

    def score(ids, cos, sin, mask, q_scale, targets):
        """Log-probabilities and argmax hits (B, C) of ``targets`` (B, C) at the last C positions."""
        local = model.forward(ids, cos, sin, mask, q_scale)[0]
        logits = model.full_logits(local[:, -targets.shape[1]:]).astype(ms.float32)  # (B, C, V)
        logp = ops.log_softmax(logits, -1)
        picked = ops.gather_elements(logp, 2, targets.reshape(targets.shape + (1,))).squeeze(-1)
        return picked, logits.argmax(-1).astype(ms.int32) == targets

    step = ms.jit(score)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    mine = [order[k] for k in _my_share(model, len(order))]
    logp, greedy = np.zeros(len(rows)), np.zeros(len(rows))
    bar = _progress_bar(len(order), progress and model.groups.global_rank == 0, "req")
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        width = _bucket(len(rows[batch[0]][0]), window, MIN_WIDTH)
        cont_width = _bucket(max(len(rows[i][1]) for i in batch), width)
        ids = np.zeros((batch_size, width), np.int32)
        keep = np.zeros((batch_size, width), np.int32)  # empty filler rows: all padding
        targets = np.zeros((batch_size, cont_width), np.int32)
        for b, i in enumerate(batch):
            inputs, continuation = rows[i]
            ids[b, width - len(inputs):], keep[b, width - len(inputs):] = inputs, 1
            targets[b, cont_width - len(continuation):] = continuation
        picked, hits = step(*model.prepare(ids, keep), Tensor(targets))
        picked, hits = picked.asnumpy(), hits.asnumpy()
        for b, i in enumerate(batch):
            n = len(rows[i][1])
            logp[i] = picked[b, -n:].astype(np.float64).sum()
            greedy[i] = float(hits[b, -n:].all())
        bar.update(len(batch) * model.groups.dp.size)
    bar.close()
    logp, greedy = _sum_over_dp(model, logp), _sum_over_dp(model, greedy)
    return [(float(value), bool(hit)) for value, hit in zip(logp, greedy)]


def rolling_windows(tokens: Sequence[int], prefix: int, window: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``loglikelihood_rolling`` windows (``get_rolling_token_windows`` with context length 1, made
    disjoint): (context, continuation) pairs whose continuations tile ``tokens``. The first window is
    predicted from ``prefix``; each later full window from the one token before it; the last, shorter one
    from as many earlier tokens as fill the window."""
    tokens = list(tokens)
    pairs, done = [], min(window, len(tokens))
    if tokens:
        pairs.append(([prefix], tokens[:done]))
    while done < len(tokens):
        end = min(len(tokens), done + window)
        pairs.append((tokens[max(end - window - 1, 0):done], tokens[done:end]))
        done = end
    return pairs


def rolling_loglikelihoods(model, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                           progress: bool = False) -> list[float]:
    """Summed log-probability of each whole sequence (the first token conditioned on the BOS/prefix token the
    caller supplies), in windows of the model's length when longer (lm-eval's `loglikelihood_rolling` rule).

    ``sequences[i][0]`` is that prefix token and is not scored; ``sequences[i][1:]`` are."""
    window = model.config.max_position_embeddings
    requests, owner = [], []
    for i, sequence in enumerate(sequences):
        if len(sequence) < 2:
            raise ValueError(f"sequence {i}: {len(sequence)} tokens: expected a prefix token and at least one more")
        pairs = rolling_windows(list(sequence[1:]), int(sequence[0]), window)
        requests += pairs
        owner += [i] * len(pairs)
    totals = [0.0] * len(sequences)
    for i, (value, _) in zip(owner, loglikelihoods(model, requests, batch_size, progress)):
        totals[i] += value
    return totals


def generate_until(model, tokenizer, prompts: Sequence[str], until: Sequence[Sequence[str]], max_new_tokens: int,
                   batch_size: int = 8, progress: bool = False, add_special_tokens: bool = False) -> list[str]:
    """Greedy continuations, cut at the first stop string of each prompt's `until` list (stop strings excluded).

    Prompts are encoded with the tokenizer's special tokens only with ``add_special_tokens`` (lm-eval's
    hf backend adds them, e.g. BOS) and, as that backend does, cut from the left to ``W - max_new_tokens``
    tokens; generation also ends at the tokenizer's EOS. Rows are left-padded to a power-of-two width, so
    the compiled decoder is reused across batches."""
    require_tensor_and_data_parallel_only(model.groups, "evaluation")
    if len(until) != len(prompts):
        raise ValueError(f"until: {len(until)} stop lists: expected one per prompt ({len(prompts)})")
    window = model.config.max_position_embeddings
    if not 0 < max_new_tokens < window:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: expected 0 < max_new_tokens < the model's window, "
                         f"max_position_embeddings = {window}")
    if batch_size <= 0:
        raise ValueError(f"batch_size = {batch_size}: expected a positive integer")
    if not prompts:
        return []
    encoded = [ids[-(window - max_new_tokens):] for ids in tokenizer.encode_batch(list(prompts), add_special_tokens)]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i}: no tokens: expected a non-empty prompt")
    eos = tokenizer.eos_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (eos or 0)
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    mine = [order[k] for k in _my_share(model, len(order))]
    tokens = np.zeros((len(prompts), max_new_tokens))  # generated id + 1; 0: nothing (after EOS, other ranks)
    bar = _progress_bar(len(order), progress and model.groups.global_rank == 0, "prompt")
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        width = _bucket(len(encoded[batch[0]]), window - max_new_tokens, MIN_WIDTH)
        ids = np.full((len(batch), width), pad, np.int64)
        keep = np.zeros((len(batch), width), np.int64)
        for b, i in enumerate(batch):
            ids[b, width - len(encoded[i]):], keep[b, width - len(encoded[i]):] = encoded[i], 1
        out = model.generate(ids, max_new_tokens, attention_mask=keep, eos_token_id=eos, pad_token_id=pad)
        for b, i in enumerate(batch):
            new = [int(t) for t in out[b, width:]]
            if eos in new:
                new = new[:new.index(eos)]
            tokens[i, :len(new)] = np.asarray(new) + 1
        bar.update(len(batch) * model.groups.dp.size)
    bar.close()
    tokens = _sum_over_dp(model, tokens)
    texts = []
    for i, row in enumerate(tokens):
        text = tokenizer.decode([int(t) - 1 for t in row if t > 0])
        for stop in until[i]:
            if stop:
                text = text.split(stop)[0]
        texts.append(text)
    return texts
