"""The Keras callbacks of a training phase: per-batch records and progress, the per-epoch random
state (batch order, dropout masks, augmentations) that makes a resumed run exact, and the learning
rate in each epoch's logs.

Imports Keras at import time: import it inside the functions that train.
"""

from __future__ import annotations

import math
import time
from typing import Any

import keras
import numpy as np

#: Augmentation layers draw a few random tensors per step (RandomZoom: 2); their generator's
#: counter is set to epoch x steps x this at each epoch start, so epochs never reuse draws.
AUGMENT_DRAWS_PER_STEP = 16


class BatchRecorder(keras.callbacks.Callback):
    """Per-batch loss/accuracy (as Keras reports them, running means over the epoch) in
    `batches` {"step", "epoch", "loss", "accuracy"}, and a tqdm progress bar in images per second.

    Steps are global batch numbers (epoch e, batch b: (e-1) * batches per epoch + b + 1), so a
    run resumed from a checkpoint numbers its batches as an uninterrupted run would. `epochs` is
    the phase's last epoch (exclusive, 0-based), for the bar's total.
    """

    def __init__(
        self, total_images: int, epochs: int, batch_size: int, progress: bool = True
    ) -> None:
        super().__init__()
        self.total_images, self.epochs, self.batch_size = total_images, epochs, batch_size
        self.steps_per_epoch = max(math.ceil(total_images / batch_size), 1)
        self.progress = progress
        self.batches: dict[str, list[float]] = {"step": [], "epoch": [], "loss": [], "accuracy": []}
        self.bar: Any = None
        self.epoch = self.in_epoch = self.seen = 0
        self.start = 0.0

    def on_train_begin(self, logs: Any = None) -> None:
        """Reset the progress bar and start the images-per-second clock."""
        self.bar = None
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        """Open the progress bar on the first epoch that runs (sized for the epochs left) and reset
        the per-epoch image count.
        """
        if self.bar is None:  # the first epoch that runs (later than 0 after a restore)
            from tqdm import tqdm

            total = self.total_images * (self.epochs - epoch)
            self.bar = tqdm(total=total, unit="img", desc="train", disable=not self.progress)
        self.epoch = epoch + 1
        self.in_epoch = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        """Record the batch's global step, epoch, loss and accuracy; advance the progress bar."""
        logs = logs or {}
        self.batches["step"].append((self.epoch - 1) * self.steps_per_epoch + batch + 1)
        self.batches["epoch"].append(self.epoch)
        self.batches["loss"].append(float(logs.get("loss", math.nan)))
        self.batches["accuracy"].append(float(logs.get("accuracy", math.nan)))
        size = min(self.batch_size, self.total_images - self.in_epoch)
        self.in_epoch += size
        self.seen += size
        self.bar.update(size)
        rate = self.seen / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(
            epoch=self.epoch,
            loss=f"{logs.get('loss', math.nan):.3f}",
            img_per_s=f"{rate:.0f}",
            refresh=False,  # drawn at tqdm's own pace (TQDM_MININTERVAL off a terminal)
        )

    def on_train_end(self, logs: Any = None) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()


class EpochState(keras.callbacks.Callback):
    """At the start of each epoch, sets everything random that depends on the epoch: the batch
    order of `datasets` (their `epoch`), the dropout masks and the augmentations of `model`'s
    layers.

    Dropout draws its masks from a `SeedGenerator` whose state Keras' checkpoints do not hold;
    setting its counter to epoch x steps per epoch (what it reaches anyway when each step draws
    once) makes the masks of a resumed run those of an uninterrupted one. Augmentation layers
    (`train.augment`) are handled alike, with room for `AUGMENT_DRAWS_PER_STEP` draws per step.
    `first_epoch` is the first epoch that ran (0-based; later than 0 when resumed from a
    checkpoint), None until one runs.
    """

    def __init__(self, datasets: list[Any], model: Any, steps_per_epoch: int) -> None:
        super().__init__()
        self.datasets, self.steps_per_epoch = datasets, steps_per_epoch
        self.first_epoch: int | None = None
        self.generators = []
        for layer in model.layers:
            for attr, stride in (("seed_generator", 1), ("generator", AUGMENT_DRAWS_PER_STEP)):
                generator = getattr(layer, attr, None)
                if isinstance(generator, keras.random.SeedGenerator):
                    base = int(np.asarray(generator.state.numpy())[0])
                    self.generators.append((generator, base, stride))

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        """Set the datasets' epoch and rewind every seed generator to where this epoch starts."""
        if self.first_epoch is None:
            self.first_epoch = epoch
        for dataset in self.datasets:
            dataset.epoch = epoch
        for generator, base, stride in self.generators:
            counter = epoch * self.steps_per_epoch * stride
            generator.state.assign(np.array([base, counter], dtype=generator.state.dtype))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds `learning_rate` to each epoch's logs: the rate of the epoch's last step (`schedule`
    evaluated there, else the optimizer's current rate). Placed before ReduceLROnPlateau, it
    records the rate the epoch trained with, before any reduction."""

    def __init__(self, schedule: Any = None) -> None:
        super().__init__()
        self.schedule = schedule

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """Add the epoch's learning rate (its last step's) to `logs` as `learning_rate`."""
        if logs is None:
            return
        optimizer = self.model.optimizer
        if self.schedule is not None:
            step = max(int(np.asarray(optimizer.iterations.numpy())) - 1, 0)
            rate = self.schedule(step)
        else:
            rate = optimizer.learning_rate
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(rate))


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore` whose checkpoint is replaced atomically after every epoch.

    Keras writes `latest.weights.h5` and `training_metadata.json` in place: a process killed
    (SIGKILL, out of memory) while writing leaves a damaged HDF5 file that the next
    `train.resume=true` cannot open. Here both are written under temporary names in the backup
    folder and renamed over the previous ones (weights first, then the epoch count), so the
    checkpoint on disk is always a complete one.

    Args:
        backup_dir: the run's checkpoint folder (`train.checkpoint_dir/<key>`).
        **kwargs: as `keras.callbacks.BackupAndRestore` (`save_freq`, `delete_checkpoint`).
    """

    def _save_model(self) -> None:
        import os

        weights, metadata = self._weights_path, self._training_metadata_path
        self._weights_path = os.path.join(self.backup_dir, "writing.weights.h5")
        self._training_metadata_path = metadata + ".writing"
        try:
            super()._save_model()
        finally:
            self._weights_path, self._training_metadata_path = weights, metadata
        os.replace(os.path.join(self.backup_dir, "writing.weights.h5"), weights)
        os.replace(metadata + ".writing", metadata)
