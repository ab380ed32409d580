"""Packed token data: ``prepare`` writes it, :class:`PackedDataset` maps it, :class:`Loader` walks it.

On disk (one directory): ``tokens.bin``, a flat array of token ids (uint16 when the vocabulary
fits, else uint32) holding ``num_samples`` samples of ``seq_length`` tokens back to back, and
``index.json`` describing it. Documents are tokenized as transformers tokenizes them (with the
tokenizer's special tokens: BOS first where it adds one, as Llama/Mixtral's and TeleChat2's do,
none for Qwen's), each followed by EOS (unless the tokenizer already ended it with EOS),
concatenated and cut into samples; the tail that does not fill a sample is dropped. This is the
published pretraining layout of these families: ``<s> doc </s><s> doc </s>...`` packed
across sample boundaries.

Supervised fine-tuning data (``mindport data prepare --format alpaca|chat``) adds two files of
the same (num_samples, seq_length) shape, and ``index.json`` says which are present
(``"labels": true``, ``"segments": true``):

- ``labels.bin`` (int32): the label of each position, aligned with the tokens as transformers'
  ``labels`` are (position t is trained to predict ``labels[t + 1]``); ``IGNORE_INDEX`` (-100)
  where no loss is taken (prompts, padding). Absent: labels = tokens.
- ``segments.bin`` (uint16): 1..k for the k sequences (conversations) packed into a sample, 0 for
  padding. Attention never crosses a segment and positions restart at each one. Absent: each
  sample is one causal sequence (the pretraining layout above).

The loader visits samples in a seeded random order, one permutation per epoch; its whole state
is the number of samples consumed, so a resumed run continues with the next unseen sample.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np

TOKENS_FILE = "tokens.bin"
INDEX_FILE = "index.json"
FORMAT = "mindport-packed-v1"


LABELS_FILE = "labels.bin"
SEGMENTS_FILE = "segments.bin"


class DataError(ValueError):
    """A data directory or its use does not fit."""


@dataclass
class Batch:
    """Rows of samples. input_ids, labels (B, S) int32 (labels as in ``labels.bin``: the tokens
    themselves for pretraining data); segment_ids (B, S) int32 as in ``segments.bin``, or None
    when every row is one causal sequence."""
    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray | None = None

    def rows(self, index) -> "Batch":
        """The rows ``index`` (a slice or index array) of every array."""
        segments = self.segment_ids[index] if self.segment_ids is not None else None
        return Batch(self.input_ids[index], self.labels[index], segments)


def prepare(texts: Iterable[str], tokenizer, out_dir: str, seq_length: int, overwrite: bool = True,
            source: str = "input") -> dict:
    """Tokenize ``texts`` (special tokens added), end each with EOS, pack into ``seq_length`` samples;
    returns the index. ``source`` names the input in errors."""
    from mindport.checkpoint.shards import StagingDir

    if seq_length < 2:
        raise DataError(f"seq_length = {seq_length}: expected at least 2")
    if tokenizer.eos_id is None:
        raise DataError(f"{tokenizer.source}: tokenizer has no EOS token")
    dtype = token_dtype(tokenizer.vocab_size)
    with StagingDir(out_dir, overwrite) as tmp:
        total, docs = 0, 0
        with open(os.path.join(tmp, TOKENS_FILE), "wb") as f:
            batch: list[str] = []

            def flush() -> int:
                written = 0
                for ids in tokenizer.encode_batch(batch):
                    eos = [] if ids and ids[-1] == tokenizer.eos_id else [tokenizer.eos_id]
                    arr = np.asarray(ids + eos, dtype=dtype)
                    f.write(arr.tobytes())
                    written += arr.size
                batch.clear()
                return written

            for text in texts:
                batch.append(text)
                docs += 1
                if len(batch) >= 256:
                    total += flush()
            total += flush()
            samples = total // seq_length
            f.truncate(samples * seq_length * np.dtype(dtype).itemsize)
            f.flush()
            os.fsync(f.fileno())
        if samples == 0:
            raise DataError(f"{source}: {docs} documents, {total} tokens, fewer than one sample of "
                            f"seq_length = {seq_length}")
        index = {"format": FORMAT, "seq_length": seq_length, "num_samples": samples, "dtype": np.dtype(dtype).name,
                 "num_documents": docs, "num_tokens": total, "dropped_tail_tokens": total - samples * seq_length,
                 "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id,
                 "tokenizer": os.path.abspath(tokenizer.source)}
        write_index(tmp, index, tokenizer)
    return index


def token_dtype(vocab_size: int) -> type:
    """tokens.bin's element type: uint16 when every id fits, else uint32."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def write_index(directory: str, index: dict, tokenizer) -> None:
    """index.json and the tokenizer (OUT/tokenizer) beside the data files."""
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    tokenizer.save(os.path.join(directory, "tokenizer"))


class PackedDataset:
    """Read-only memory map of a prepared directory; ``ds[i]`` is sample i, (seq_length,) int32."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{directory}: not a prepared data directory (no {INDEX_FILE}; "
                                    "run `mindport data prepare`)")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT:
            raise DataError(f"{index_path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.directory = directory
        self.seq_length = int(self.index["seq_length"])
        self.num_samples = int(self.index["num_samples"])
        if self.num_samples <= 0:
            raise DataError(f"{os.path.join(directory, TOKENS_FILE)}: empty ({index_path} has num_samples = "
                            f"{self.num_samples}); run `mindport data prepare` again")
        self.tokens = self._map(TOKENS_FILE, self.index["dtype"])
        self.labels = self._map(LABELS_FILE, np.int32) if self.index.get("labels") else None
        self.segments = self._map(SEGMENTS_FILE, np.uint16) if self.index.get("segments") else None

    @property
    def has_segments(self) -> bool:
        """Rows hold segments (packed or padded sequences), not one causal sequence each."""
        return self.segments is not None

    def _map(self, name: str, dtype) -> np.memmap:
        """(num_samples, seq_length) read-only map of file ``name``, its size checked against index.json."""
        path = os.path.join(self.directory, name)
        expected = self.num_samples * self.seq_length * np.dtype(dtype).itemsize
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size != expected:
            found = f"{size} bytes" if size >= 0 else "missing"
            raise DataError(f"{path}: {found}, {INDEX_FILE} implies {expected} ({self.num_samples} x "
                            f"{self.seq_length} {np.dtype(dtype).name})")
        return np.memmap(path, dtype=dtype, mode="r", shape=(self.num_samples, self.seq_length))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[i], dtype=np.int32)

    def batch(self, indices) -> Batch:
        """The samples at ``indices`` as one :class:`Batch` (without labels.bin: labels = tokens; without
        segments.bin: one sequence per row)."""
        rows = [int(i) for i in indices]

        def gather(array: np.ndarray) -> np.ndarray:
            return np.stack([np.asarray(array[i], dtype=np.int32) for i in rows])

        ids = gather(self.tokens)
        labels = gather(self.labels) if self.labels is not None else ids.copy()
        return Batch(ids, labels, gather(self.segments) if self.segments is not None else None)

    def check(self, seq_length: int, vocab_size: int) -> None:
        if self.seq_length != seq_length:
            raise DataError(f"{self.directory}: samples of {self.seq_length} tokens, the run wants seq_length = "
                            f"{seq_length} (prepare the data again with --seq-length {seq_length})")
        if int(self.index["vocab_size"]) > vocab_size:
            raise DataError(f"{self.directory}: tokenizer vocabulary {self.index['vocab_size']} exceeds the model's "
                            f"vocab_size = {vocab_size}")

    @property
    def tokenizer_dir(self) -> str | None:
        path = os.path.join(self.directory, "tokenizer")
        return path if os.path.isdir(path) else None


class Loader:
    """Seeded shuffled batches; state = samples consumed (epoch = consumed // len)."""

    def __init__(self, dataset: PackedDataset, batch_size: int, seed: int, consumed: int = 0):
        if batch_size <= 0:
            raise DataError(f"batch_size = {batch_size}: expected a positive integer")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.consumed = consumed
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return self._perm

    def sample_ids(self, count: int) -> np.ndarray:
        """The dataset indices of the next ``count`` samples (advances the position)."""
        n = len(self.dataset)
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            epoch, i = divmod(self.consumed + k, n)
            out[k] = self._order(epoch)[i]
        self.consumed += count
        return out

    def next_batch(self) -> Batch:
        """The next ``batch_size`` samples, each array (batch_size, seq_length)."""
        return self.dataset.batch(self.sample_ids(self.batch_size))

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.dataset)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "batch_size": self.batch_size,
                "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples") != len(self.dataset) or state.get("seed") != self.seed:
            raise DataError(f"{self.dataset.directory}: the checkpoint's data position was recorded for "
                            f"{state.get('num_samples')} samples with seed {state.get('seed')}, this run has "
                            f"{len(self.dataset)} samples with seed {self.seed}")
        self.consumed = int(state["consumed"])
