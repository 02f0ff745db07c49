"""A line every few seconds inside an epoch: Keras' ``verbose=2`` prints one line per
epoch, and an epoch of the Fashion-MNIST profile on 2 CPU cores is about a minute of
silence. (``verbose=1``'s bar redraws with carriage returns, which log files and Prefect's
log view show as one line per update.)"""

from __future__ import annotations

import time
from typing import Any

PROGRESS_EVERY_S = 10.0  # seconds between progress lines inside an epoch


def epoch_progress(steps: int, global_batch: int, epochs: int, every_s: float = PROGRESS_EVERY_S):
    """A Keras callback printing ``epoch E/N: S/T steps, R img/s, ETA X s`` every
    ``every_s`` seconds of an epoch (none for an epoch shorter than that)."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch
            self.started = self.last = time.monotonic()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            now = time.monotonic()
            if now - self.last < every_s:
                return
            self.last = now
            done = batch + 1
            rate = done / (now - self.started)  # steps per second
            eta = (steps - done) / rate if rate else float("nan")
            print(
                f"  epoch {self.epoch + 1}/{epochs}: {done}/{steps} steps, "
                f"{rate * global_batch:,.0f} img/s, ETA {eta:.0f} s",
                flush=True,
            )

    return EpochProgress()
