"""Stop training the step the loss stops being a number.

Keras' own TerminateOnNaN stops `fit` on a NaN or infinite batch loss but only prints a
line; the stage must fail instead, saying when and why, so that nothing downstream
(evaluate, register, export) ever sees the diverged model.
"""

from __future__ import annotations

from typing import Any

from tasks.errors import DivergedError


def non_finite_loss_guard() -> Any:
    """Keras' TerminateOnNaN, remembering the epoch and step it stopped at."""
    import keras

    class NonFiniteLossGuard(keras.callbacks.TerminateOnNaN):
        stopped_at: tuple[int, int, float] | None = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            super().on_batch_end(batch, logs)
            if self.model.stop_training and self.stopped_at is None and logs:
                self.stopped_at = (self.epoch, batch, float(logs.get("loss", float("nan"))))

    return NonFiniteLossGuard()


def raise_if_diverged(guard: Any, learning_rate: float, key: str = "train.learning_rate") -> None:
    """The stage's one-line failure for a guard that stopped training."""
    if guard.stopped_at is None:
        return
    epoch, step, loss = guard.stopped_at
    raise DivergedError(
        f"training diverged: the loss became {loss} at epoch {epoch + 1}, step {step + 1}; "
        f"the likely cause is a learning rate too high for this model and batch "
        f"({key}={learning_rate:g}): lower it. Nothing was saved, registered or exported"
    )
