"""Resumable training: a checkpoint per epoch, and per-epoch metrics that survive a crash.

A crash of the train stage (kill -9, a lost machine, a Prefect retry) must not cost the
epochs already trained, and the rerun must end exactly where an uninterrupted run ends
(on CPU, with op determinism). Keras' `BackupAndRestore` saves the weights and optimizer
state after each epoch into the run's work directory; a rerun restores them and fit()
continues at the next epoch. Three things around it make the result exact and the
records clean:

- the checkpoint lives in a directory keyed by everything that shapes training (the
  model, train and preprocess params and the prepared data's bytes), so a change of
  params or data never resumes a stale checkpoint; other keys' directories are removed;
- the training data order is a function of (seed, epoch) (`augment.dali_dataset`'s
  ``epoch``), so epoch k after a resume sees the batches it would have seen;
- per-epoch metrics go to MLflow with ``step=epoch``, skipping steps the run already has,
  and to a history CSV kept beside the checkpoint, cut back to the restored epoch.

The directory is removed once the trained model is written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig
from tasks.tracking import store
from tasks.workspace import Workspace

CHECKPOINTS = Path(".pipeline") / "checkpoints"
# Metric logging to a tracking server that stopped answering: keep training, keep the
# epochs' metrics in memory, and try again at each epoch end; after training, try for
# at most store.timeout_s() (PIPELINE_TRACKING_TIMEOUT_S, 30 s) before the stage fails.
FLUSH_RETRY_S = 2.0


def training_key(cfg: PipelineConfig, ws: Workspace) -> str:
    """A digest of what shapes the trained weights: params that training reads, and data."""
    digest = hashlib.sha256()
    shaping = {"model": cfg.model.model_dump(), "train": cfg.train.model_dump()}
    shaping["preprocess"] = cfg.preprocess.model_dump()
    shaping["text"] = cfg.data.text.sequence_length
    digest.update(json.dumps(shaping, sort_keys=True).encode())
    for folder in (ws.prepared, ws.preprocessed):
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TrainCheckpoint:
    """The checkpoint directory of one training configuration in one work directory."""

    root: Path

    @classmethod
    def for_run(cls, cfg: PipelineConfig, ws: Workspace, worker: int = 0) -> TrainCheckpoint:
        """``worker`` > 0: a multi-worker run's other workers keep their own copy (their
        weights equal the chief's after every step), so each resumes from its own."""
        key = training_key(cfg, ws)
        parent = ws.root / CHECKPOINTS
        if parent.is_dir():  # checkpoints of other params or data can never be resumed
            for stale in parent.iterdir():
                if stale.name.split("-worker")[0] != f"train-{key}":
                    shutil.rmtree(stale, ignore_errors=True)
        return cls(parent / (f"train-{key}-worker{worker}" if worker else f"train-{key}"))

    def backup_dir(self, phase: str) -> Path:
        """One per training phase: a phase's optimizer differs (transfer fine-tuning trains
        more variables), so its state never loads into another phase's."""
        return self.root / f"backup-{phase}"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    def completed_epochs(self) -> int:
        """Epochs the latest saved checkpoint holds (0 when there is none); epochs count on
        across phases."""
        done = [
            int(json.loads(metadata.read_text())["epoch"])
            for metadata in self.root.glob("backup-*/training_metadata.json")
        ]
        return max(done, default=0)

    def has_checkpoint(self, phase: str) -> bool:
        return (self.backup_dir(phase) / "training_metadata.json").is_file()

    def prepare_history(self, epochs_done: int) -> None:
        """Keep the history rows of the epochs the checkpoint holds, drop later ones.

        A crash between writing a row and saving the checkpoint leaves a row the rerun
        will write again; a fresh start keeps none.
        """
        if epochs_done == 0 or not self.history.is_file():
            self.history.unlink(missing_ok=True)
            return
        rows = list(csv.reader(self.history.open(newline="")))
        with self.history.open("w", newline="") as handle:
            csv.writer(handle).writerows(rows[: 1 + epochs_done])

    def callbacks(self, phase: str) -> list[Any]:
        """CSV history (appending across attempts and phases), then the epoch checkpoint."""
        import keras

        self.root.mkdir(parents=True, exist_ok=True)
        return [
            keras.callbacks.CSVLogger(str(self.history), append=True),
            # Last, so the metrics of an epoch are recorded before its checkpoint exists.
            keras.callbacks.BackupAndRestore(
                str(self.backup_dir(phase)), save_freq="epoch", delete_checkpoint=False
            ),
        ]

    def read_history(self) -> dict[str, list[float]]:
        return self.read_history_file(self.history)

    @staticmethod
    def read_history_file(path: Path) -> dict[str, list[float]]:
        rows = list(csv.DictReader(path.open(newline="")))
        keys = [key for key in (rows[0] if rows else {}) if key != "epoch"]
        return {key: [float(row[key]) for row in rows] for key in keys}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def epoch_metrics_logger(run_id: str) -> Any:
    """A Keras callback logging each epoch's metrics to ``run_id`` at ``step=epoch``.

    Steps the run already holds (a resumed attempt redoing an epoch whose metrics were
    logged before the crash) are not logged again. If the tracking server does not
    answer, the metrics wait in memory and training goes on; `flush` at the end tries
    for at most store.timeout_s() and then raises with the server's URL.
    """
    import keras
    import mlflow

    class EpochMetricsLogger(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.client = mlflow.MlflowClient()
            history = self.client.get_metric_history(run_id, "loss")
            self.logged = {metric.step for metric in history}
            self.pending: list[Any] = []

        def backfill(self, history: dict[str, list[float]]) -> None:
            """Log the restored epochs the run lacks (their attempt died before logging)."""
            for epoch in range(len(next(iter(history.values()), []))):
                self.on_epoch_end(epoch, {name: values[epoch] for name, values in history.items()})

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch in self.logged:
                return
            stamp = int(time.time() * 1000)
            for name, value in (logs or {}).items():
                self.pending.append(mlflow.entities.Metric(name, float(value), stamp, epoch))
            self.logged.add(epoch)
            self._send()

        def _send(self) -> bool:
            if not self.pending:
                return True
            try:
                self.client.log_batch(run_id, metrics=self.pending)
            except Exception:  # whatever the cause, keep them and try again later
                return False
            self.pending = []
            return True

        def flush(self) -> None:
            limit_s = store.timeout_s()
            end = time.monotonic() + limit_s
            while not self._send():
                if time.monotonic() > end:
                    raise store.TrackingUnreachable(
                        f"the tracking server {mlflow.get_tracking_uri()} did not take "
                        f"{len(self.pending)} epoch metric values for {limit_s:.0f} s; the "
                        "model and history are written: rerun the stage once it answers "
                        "(it resumes from the checkpoint and logs them)"
                    )
                time.sleep(FLUSH_RETRY_S)

    return EpochMetricsLogger()
