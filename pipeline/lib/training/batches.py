"""Training batches whose order is a pure function of (seed, epoch)."""

from __future__ import annotations

import math

import keras
import numpy as np


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """int64 (n,) order of epoch `epoch` (0-based): a permutation seeded by (seed, epoch), or
    the identity without shuffling."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)


class ArrayBatches(keras.utils.PyDataset):
    """Batches of an array and its one-hot labels, for `fit(..., shuffle=False)`.

    Args:
        x: (N, ...) inputs: cached features float32 (N, D) in memory, or memory-mapped prepared
            images uint8 (N, H, W, 3); batches are returned as float32.
        targets: (N, C) one-hot labels.
        batch_size: images per batch (the last one may be smaller).
        shuffle: whether each epoch has its own order.
        seed: the seed of that order.

    The order of epoch e is a pure function of (seed, e), whatever ran before: an `epoch_state`
    callback sets `epoch` at the start of each epoch, and the permutation is computed from it
    when first needed, so a run resumed at epoch e sees the batches an uninterrupted run sees.
    """

    def __init__(
        self, x: np.ndarray, targets: np.ndarray, batch_size: int, shuffle: bool, seed: int
    ) -> None:
        super().__init__()
        self.x, self.targets = x, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def order(self) -> np.ndarray:
        """The permutation of the current epoch (the identity without shuffling)."""
        epoch, cached = self.epoch, self._order  # one read each: prefetch runs in a thread
        if cached is None or cached[0] != epoch:
            perm = epoch_order(len(self.x), self.shuffle, self.seed, epoch)
            cached = self._order = (epoch, perm)
        return cached[1]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        # sorted: a memory map is read in order
        idx = np.sort(self.order()[i * self.batch_size : (i + 1) * self.batch_size])
        return np.asarray(self.x[idx], dtype=np.float32), self.targets[idx]
