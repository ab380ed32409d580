"""Weighted data mixtures: ``train_dataset.data_dirs: [{path, weight}, ...]``, sampled in exact
proportion over each epoch and resumed exactly.

Notation: K sources, source k holds n_k samples and has weight w_k; T = sum_k n_k samples make one
epoch of the mixture.

- Counts: source k gives c_k samples per epoch, T * w_k / sum(w) rounded by the largest-remainder
  method (Hamilton's apportionment), so sum_k c_k = T and |c_k - T w_k / sum(w)| < 1.
- Order: the j-th sample of source k (j < c_k) sits at time (j + 1/2) / c_k; an epoch is all
  (time, k) sorted (ties by k): every source is spread evenly over the epoch, each prefix of an epoch
  holds each source within one sample of its share.
- Samples: each source walks its own stream of seeded permutations, one per pass over it
  (``rng([seed, k, pass])``), continuing across mixture epochs; a source with c_k > n_k is repeated,
  one with c_k < n_k continues where it stopped in the next epoch.

The whole state is the number of samples consumed (as :class:`~mindport.train.data.Loader`'s): the
epoch, the position in it, and each source's position in its stream follow from it.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from mindport.train.data import Batch, DataError, PackedDataset

KEY = "train_dataset.data_dirs"


def apportion(total: int, weights: list[float]) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder, ties to the
    first source)."""
    exact = np.asarray(weights, np.float64) * total / float(sum(weights))
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[:total - int(counts.sum())]:
        counts[k] += 1
    return counts


def epoch_schedule(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position of an epoch: the source it draws from, and which of that source's c_k samples of the
    epoch it is; both (sum(counts),), every source spread evenly."""
    times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
    sources = np.concatenate([np.full(c, k, np.int32) for k, c in enumerate(counts) if c])
    ranks = np.concatenate([np.arange(c, dtype=np.int64) for c in counts if c])
    order = np.lexsort((sources, times))
    return sources[order], ranks[order]


def _tokenizer_digest(dataset: PackedDataset) -> str | None:
    """sha256 of the tokenizer file ``data prepare`` saved with the data (None: none saved)."""
    directory = dataset.tokenizer_dir
    for name in ("tokenizer.model", "tokenizer.json"):
        if directory and os.path.isfile(os.path.join(directory, name)):
            with open(os.path.join(directory, name), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
    return None


class Mixture:
    """The K prepared directories of a mixture and their weights; they share seq_length and tokenizer."""

    def __init__(self, sources: list[dict]):
        self.datasets = [PackedDataset(source["path"]) for source in sources]
        self.weights = [float(source["weight"]) for source in sources]
        first = self.datasets[0]
        for k, dataset in enumerate(self.datasets[1:], 1):
            for what, mine, theirs in (("seq_length", dataset.seq_length, first.seq_length),
                                       ("tokenizer vocab_size", dataset.index["vocab_size"], first.index["vocab_size"]),
                                       ("tokenizer file", _tokenizer_digest(dataset), _tokenizer_digest(first))):
                if mine != theirs:
                    raise DataError(f"{KEY}[{k}] {dataset.directory}: {what} differs from {KEY}[0] "
                                    f"{first.directory}: every source must be prepared with one tokenizer and "
                                    f"seq_length")
        self.counts = apportion(len(self), self.weights)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def check(self, seq_length: int, vocab_size: int) -> None:
        for dataset in self.datasets:
            dataset.check(seq_length, vocab_size)

    @property
    def tokenizer_dir(self) -> str | None:
        return self.datasets[0].tokenizer_dir

    @property
    def has_segments(self) -> bool:
        return any(d.has_segments for d in self.datasets)


def _stack(batches: list[Batch]) -> Batch:
    """One Batch of the rows of ``batches``; rows without segments count as one sequence (segment 1)."""
    segments = None
    if any(b.segment_ids is not None for b in batches):
        segments = np.concatenate([b.segment_ids if b.segment_ids is not None else np.ones_like(b.input_ids)
                                   for b in batches])
    return Batch(np.concatenate([b.input_ids for b in batches]), np.concatenate([b.labels for b in batches]),
                 segments)


class MixtureLoader:
    """:class:`~mindport.train.data.Loader`'s interface over a :class:`Mixture`; state = samples consumed."""

    def __init__(self, mixture: Mixture, batch_size: int, seed: int, consumed: int = 0):
        if batch_size <= 0:
            raise DataError(f"batch_size = {batch_size}: expected a positive integer")
        self.mixture, self.batch_size, self.seed = mixture, batch_size, seed
        self.consumed = consumed
        self._sources, self._ranks = epoch_schedule(mixture.counts)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _sample(self, k: int, position: int) -> int:
        """Source k's sample at ``position`` of its stream of per-pass permutations."""
        n = len(self.mixture.datasets[k])
        passes, i = divmod(position, n)
        if (k, passes) not in self._perms:
            self._perms = {key: p for key, p in self._perms.items() if key[0] != k}  # one pass per source kept
            self._perms[(k, passes)] = np.random.default_rng([self.seed, k, passes]).permutation(n)
        return int(self._perms[(k, passes)][i])

    def sample_ids(self, count: int) -> list[tuple[int, int]]:
        """(source, sample index) of the next ``count`` samples (advances the position)."""
        out = []
        for step in range(self.consumed, self.consumed + count):
            epoch, position = divmod(step, len(self._sources))
            k = int(self._sources[position])
            out.append((k, self._sample(k, epoch * int(self.mixture.counts[k]) + int(self._ranks[position]))))
        self.consumed += count
        return out

    def next_batch(self) -> Batch:
        """(batch_size, seq_length) rows in schedule order."""
        return _stack([self.mixture.datasets[k].batch([i]) for k, i in self.sample_ids(self.batch_size)])

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.mixture)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "batch_size": self.batch_size,
                "sources": [{"num_samples": len(d), "weight": w}
                            for d, w in zip(self.mixture.datasets, self.mixture.weights)]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sources") != self.state_dict()["sources"] or state.get("seed") != self.seed:
            raise DataError(f"{KEY}: the checkpoint's data position was recorded for sources {state.get('sources')} "
                            f"with seed {state.get('seed')}, this run has {self.state_dict()['sources']} with seed "
                            f"{self.seed}")
        self.consumed = int(state["consumed"])
