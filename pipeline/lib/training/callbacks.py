"""A Keras training phase's batches (ordered by (seed, epoch)) and callbacks: per-batch records,
the per-epoch random state that makes a resumed run exact, each epoch's learning rate."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

#: Augmentation layers draw a few random tensors per step (RandomZoom: 2); their generator's
#: counter is set to epoch x steps x this at each epoch start, so epochs never reuse draws.
AUGMENT_DRAWS_PER_STEP = 16


class BatchRecorder(keras.callbacks.Callback):
    """Appends each batch's step (numbered as in an uninterrupted run), epoch, loss and accuracy
    (Keras' running means) to `batches`; a tqdm bar in images/s up to `epochs` (exclusive)."""

    def __init__(
        self, batches: dict[str, list[float]], total_images: int, epochs: int, batch_size: int
    ) -> None:
        super().__init__()
        self.batches, self.total_images, self.epochs = batches, total_images, epochs
        self.batch_size, self.bar, self.epoch = batch_size, None, 0
        self.steps_per_epoch = max(math.ceil(total_images / batch_size), 1)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.bar is None:  # the first epoch that runs (later than 0 after a restore)
            total = self.total_images * (self.epochs - epoch)
            self.bar = tqdm(total=total, unit="img", desc="train")
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches["step"].append((self.epoch - 1) * self.steps_per_epoch + batch + 1)
        self.batches["epoch"].append(self.epoch)
        self.batches["loss"].append(float(logs["loss"]))
        self.batches["accuracy"].append(float(logs["accuracy"]))
        self.bar.update(min(self.batch_size, self.total_images - batch * self.batch_size))
        # drawn at tqdm's own pace (TQDM_MININTERVAL off a terminal)
        self.bar.set_postfix(epoch=self.epoch, loss=f"{logs['loss']:.3f}", refresh=False)

    def on_train_end(self, logs: Any = None) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochState(keras.callbacks.Callback):
    """At each epoch start, sets what Keras' checkpoints lack as an uninterrupted run has it:
    `dataset`'s batch order and the `SeedGenerator` counters of `model`'s dropout and augmentation
    layers. `first_epoch`: the first epoch that ran (0-based), None until one runs."""

    def __init__(self, dataset: Any, model: Any, steps_per_epoch: int) -> None:
        super().__init__()
        self.dataset, self.steps_per_epoch = dataset, steps_per_epoch
        self.first_epoch: int | None = None
        self.generators = []
        for layer in model.layers:
            for attr, stride in (("seed_generator", 1), ("generator", AUGMENT_DRAWS_PER_STEP)):
                generator = getattr(layer, attr, None)
                if isinstance(generator, keras.random.SeedGenerator):
                    base = int(np.asarray(generator.state.numpy())[0])
                    self.generators.append((generator, base, stride))

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
        self.dataset.epoch = epoch
        for generator, base, stride in self.generators:
            counter = epoch * self.steps_per_epoch * stride
            generator.state.assign(np.array([base, counter], dtype=generator.state.dtype))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds to each epoch's logs its last step's `learning_rate` (`schedule`'s, else the
    optimizer's)."""

    def __init__(self, schedule: Any = None) -> None:
        super().__init__()
        self.schedule = schedule

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        optimizer = self.model.optimizer
        if self.schedule is not None:
            step = max(int(np.asarray(optimizer.iterations.numpy())) - 1, 0)
            rate = self.schedule(step)
        else:
            rate = optimizer.learning_rate
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(rate))


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore` writing under temporary names renamed over the old files (Keras
    writes in place: a killed process would leave files `train.resume` cannot open)."""

    def _save_model(self) -> None:
        weights, metadata = self._weights_path, self._training_metadata_path
        self._weights_path = os.path.join(self.backup_dir, "writing.weights.h5")
        self._training_metadata_path = metadata + ".writing"
        try:
            super()._save_model()
        except OSError:  # a full disk: no half file (the last epoch's files stay)
            Path(self._weights_path).unlink(missing_ok=True)
            raise
        finally:
            self._weights_path, self._training_metadata_path = weights, metadata
        os.replace(os.path.join(self.backup_dir, "writing.weights.h5"), weights)
        os.replace(metadata + ".writing", metadata)


class ArrayBatches(keras.utils.PyDataset):
    """Batches (float32 inputs, (N, C) one-hot `targets`) of `x` (N, ...): features (N, D) or
    memory-mapped uint8 images (N, H, W, 3). With `shuffle`, epoch e's order is a permutation
    seeded by (seed, e) (`EpochState` sets `epoch`): a resumed run sees an uninterrupted one's."""

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
        epoch, cached = self.epoch, self._order  # one read each: prefetch runs in a thread
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            perm = rng.permutation(len(self.x)) if self.shuffle else np.arange(len(self.x))
            cached = self._order = (epoch, perm)
        return cached[1]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        # sorted: a memory map is read in order
        idx = np.sort(self.order()[i * self.batch_size : (i + 1) * self.batch_size])
        return np.asarray(self.x[idx], dtype=np.float32), self.targets[idx]
