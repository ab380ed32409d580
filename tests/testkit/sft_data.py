"""SFT data directories written directly in the layout of :mod:`mindport.train.data` (tokens.bin,
labels.bin, segments.bin, index.json), so the readers are tested without ``mindport data prepare``.

A *sequence* is (ids, labels): lists of equal length, labels aligned with the ids as transformers'
are (IGNORE_INDEX where no loss is taken).
"""
from __future__ import annotations

import json
import os

import numpy as np

from mindport.constants import IGNORE_INDEX


def pack(sequences, seq_length: int, pad_id: int = 0, packed: bool = True):
    """tokens, labels, segments (N, seq_length) of ``sequences`` placed in order: several per row
    (segments 1..k) with ``packed``, else one per row; the rest of a row is padding (segment 0,
    labels ignored). Returns the arrays and, per sequence, its (row, start)."""
    rows, places = [[]], []
    for ids, _ in sequences:
        if len(ids) > seq_length:
            raise ValueError(f"sequence of {len(ids)} tokens: longer than seq_length = {seq_length}")
        used = sum(len(sequences[k][0]) for k in rows[-1])
        if rows[-1] and (not packed or used + len(ids) > seq_length):
            rows.append([])
            used = 0
        places.append((len(rows) - 1, used))
        rows[-1].append(len(places) - 1)
    tokens = np.full((len(rows), seq_length), pad_id, np.int64)
    labels = np.full((len(rows), seq_length), IGNORE_INDEX, np.int32)
    segments = np.zeros((len(rows), seq_length), np.uint16)
    for k, (ids, lab) in enumerate(sequences):
        row, start = places[k]
        tokens[row, start:start + len(ids)] = ids
        labels[row, start:start + len(ids)] = lab
        segments[row, start:start + len(ids)] = rows[row].index(k) + 1
    return tokens, labels, segments, places


def write(directory: str, tokens: np.ndarray, vocab_size: int, labels: np.ndarray | None = None,
          segments: np.ndarray | None = None, tokenizer_dir: str | None = None) -> str:
    """A data directory holding ``tokens`` (N, S) and, when given, labels.bin and segments.bin."""
    import shutil

    from mindport.train.data import FORMAT, INDEX_FILE, LABELS_FILE, SEGMENTS_FILE, TOKENS_FILE

    os.makedirs(directory, exist_ok=True)
    n, s = tokens.shape
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    files = [(TOKENS_FILE, tokens, dtype), (LABELS_FILE, labels, np.int32), (SEGMENTS_FILE, segments, np.uint16)]
    for name, array, kind in files:
        if array is not None:
            np.ascontiguousarray(array, dtype=kind).tofile(os.path.join(directory, name))
    index = {"format": FORMAT, "seq_length": s, "num_samples": n, "dtype": np.dtype(dtype).name,
             "vocab_size": vocab_size, "labels": labels is not None, "segments": segments is not None}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f)
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, os.path.join(directory, "tokenizer"), dirs_exist_ok=True)
    return directory


def synthetic_sequences(count: int, vocab_size: int, min_len: int, max_len: int, seed: int = 0):
    """``count`` random sequences, each a prompt (labels ignored) then a response (labels = ids)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(1, vocab_size, length)
        prompt = int(rng.integers(1, length))
        labels = np.where(np.arange(length) < prompt, IGNORE_INDEX, ids)
        out.append((ids.tolist(), labels.tolist()))
    return out
