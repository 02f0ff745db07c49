"""Train stage: fit the configured Keras model on the modality's batches (images:
DALI-augmented, tasks/images/train.py; text: token windows, tasks/text/train.py).

Reads data/prepared and the preprocess stage's normalization stats; writes
models/model.keras and reports/history.csv (per-epoch metrics, a DVC plot). Per-epoch
metrics also go to the pipeline's MLflow run, at step = epoch. A checkpoint after each
epoch lets a rerun after a crash resume where it stopped (tasks/training/checkpoint.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import PipelineConfig, modality
from tasks.errors import DistributeError, DivergedError
from tasks.modality import TrainingData
from tasks.models.build import build_model, check_input_fits, check_weights, enter_phase
from tasks.models.catalog import Phase, image_size_key, training_phases
from tasks.tracking import runs
from tasks.training import distribute, recipe
from tasks.training.checkpoint import TrainCheckpoint, epoch_metrics_logger
from tasks.training.device import resolve_device
from tasks.training.divergence import non_finite_loss_guard, raise_if_diverged
from tasks.training.progress import epoch_progress
from tasks.workspace import Workspace, atomic_path


def seed_everything(seed: int, deterministic_ops: bool = True) -> None:
    """Same seed, same data, same params -> same metrics on CPU (op determinism on).

    Keras silently compiles without XLA while op determinism is on, so a run that asks
    for XLA turns it off (that run is then not bit-reproducible). TensorFlow has no
    public switch back, hence the framework-internal one; the setting is process-wide.
    """
    import keras
    from tensorflow.python.framework import config as tf_config

    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def build_for_training(
    cfg: PipelineConfig, input_shape: tuple[int, ...], outputs: int, steps: int
) -> Any:
    """Build and compile the model under the resolved precision policy and XLA setting."""
    return recipe.compile_model(_build(cfg, input_shape, outputs), cfg.train, steps, xla=_xla(cfg))


def _xla(cfg: PipelineConfig) -> bool:
    return recipe.resolve_xla(cfg.train.xla, resolve_device(cfg.preprocess.device))


def _build(cfg: PipelineConfig, input_shape: tuple[int, ...], outputs: int) -> Any:
    """The seeded, uncompiled model. The global dtype policy is set only while the layers
    are created (they keep it), so nothing else in the process, evaluation included,
    inherits it."""
    import keras

    seed_everything(cfg.train.seed, deterministic_ops=not _xla(cfg))
    previous = keras.config.dtype_policy()
    device = resolve_device(cfg.preprocess.device)
    keras.config.set_dtype_policy(recipe.resolve_precision(cfg.train.precision, device))
    try:
        return build_model(cfg.model, input_shape, outputs)
    finally:
        keras.config.set_dtype_policy(previous)


def fit(
    cfg: PipelineConfig,
    data: TrainingData,
    epoch: Any,
    callbacks: list[Any] | None = None,
    checkpoint: TrainCheckpoint | None = None,
    dist: distribute.Distribution | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Build the model and fit it phase by phase; return it with its per-epoch history.

    ``epoch`` is the int64 variable the data pipeline reads the epoch from (see
    `TrainingData`); a callback sets it at each epoch's start, so the order of epoch k is
    the same after a resume at k. A phase is skipped when a later one has a checkpoint:
    that checkpoint holds every weight. Model, optimizer (EMA included) and metrics are
    built in the strategy's scope (``dist``, train.distribute by default), and ``fit``
    runs there: one loop for one device, several, or several workers.
    """
    import keras

    dist = dist or distribute.for_config(cfg.train)
    phases = training_phases(cfg)
    with dist.scope():
        model = _build(cfg, data.input_shape, data.outputs)  # compiled per phase below
    train, val = dist.dataset(data.train), dist.dataset(data.val)
    replicas = dist.replicas_in_sync
    steps = distribute.steps_per_epoch(data.train_examples, cfg.train.batch_size, replicas)
    clock = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epoch.assign(e))
    last_epoch = phases[-1].end_epoch
    progress = epoch_progress(steps, cfg.train.batch_size * replicas, last_epoch)
    history: dict[str, list[float]] = {}
    for phase in phases:
        later = [p for p in phases if p.index > phase.index]
        if checkpoint and any(checkpoint.has_checkpoint(p.name) for p in later):
            continue
        settings = cfg.train.model_copy(
            update={
                "learning_rate": phase.learning_rate,
                "epochs": phase.end_epoch - phase.first_epoch,
            }
        )
        marker = [phase_marker(phase)] if len(phases) > 1 else []
        guard = non_finite_loss_guard()
        with dist.scope():
            enter_phase(model, phase, cfg.model)
            recipe.compile_model(model, settings, steps, xla=_xla(cfg), replicas=replicas)
            dist.prepare(model)
            result = _fit_or_name_the_lost_worker(
                model,
                checkpoint,
                train,
                validation_data=val,
                initial_epoch=phase.first_epoch,
                epochs=phase.end_epoch,
                callbacks=[
                    clock,
                    guard,  # before the loggers and checkpoints of the epoch it stops
                    progress,
                    *marker,
                    *(callbacks or []),
                    *(checkpoint.callbacks(phase.name) if checkpoint else []),
                ],
                shuffle=False,  # the data pipeline reshuffles every epoch itself
                verbose=2,
            )
        key = "train.finetune_learning_rate" if phase.index else "train.learning_rate"
        raise_if_diverged(guard, phase.learning_rate, key)
        for key, values in result.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    return model, history


def _fit_or_name_the_lost_worker(
    model: Any, checkpoint: TrainCheckpoint | None, train: Any, **kwargs: Any
) -> Any:
    """``model.fit``; when another worker of a multi_worker cluster is gone, one line that
    names it and says how to resume, instead of TensorFlow's page of collective errors."""
    try:
        return model.fit(train, **kwargs)
    except Exception as error:
        lost = distribute.peer_failure(error)
        if lost is None:
            raise
        done = checkpoint.completed_epochs() if checkpoint else 0
        raise DistributeError(
            f"{lost}. Start that worker again and rerun the train stage on every worker "
            f"with the same TF_CONFIG: each resumes after epoch {done}, its last checkpoint"
        ) from None


def phase_marker(phase: Phase) -> Any:
    """Adds ``phase`` (0 frozen, 1 fine-tuning) to each epoch's logs, so history.csv and
    the MLflow run say which phase an epoch belongs to; it runs before the loggers."""
    import keras

    return keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: logs.__setitem__("phase", float(phase.index))
    )


def train_model(
    cfg: PipelineConfig,
    train_split: tuple[np.ndarray, np.ndarray],
    val_split: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    stats: Any,
    callbacks: list[Any] | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Fit an image model on in-memory splits (tests and benchmarks; the stage reads the
    workspace through `run`)."""
    from tasks.images.train import image_training_data

    dist = distribute.for_config(cfg.train)  # before the first TensorFlow op
    epoch = _epoch_variable()
    data = image_training_data(cfg, train_split, val_split, num_classes, stats, epoch)
    return fit(cfg, data, epoch, callbacks, dist=dist)


def _epoch_variable() -> Any:
    import tensorflow as tf

    with tf.device("/cpu:0"):
        return tf.Variable(0, dtype=tf.int64, trainable=False)


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, list[float]]:
    """The stage as `dvc repro` and the Prefect flow call it.

    ``train.distribute: multi_worker`` without TF_CONFIG starts ``train.workers`` local
    worker processes running this stage (tasks/training/workers.py); in a worker, only the chief
    tracks and writes the stage's outputs.
    """
    if distribute.launches_workers(cfg.train):
        from tasks.training import workers

        workers.run_local_workers(cfg, ws)
        return TrainCheckpoint.read_history_file(ws.history)
    runs.configure(cfg, ws)  # the registry a models:/ base is read from
    dist = distribute.for_config(cfg.train)  # before TensorFlow runs anything
    check_weights(cfg.model)  # pretrained weights reachable? before any work
    epoch = _epoch_variable()
    if modality(cfg.data.source) == "text":
        from tasks.text.train import training_data
    else:
        from tasks.images.train import training_data
    data = training_data(cfg, ws, epoch)
    check_input_fits(cfg.model, data.input_shape, data.outputs, image_size_key(cfg))
    summary = dist.describe(cfg.train.batch_size)
    if not dist.chief:  # trains in step with the chief; writes only its own checkpoint
        ckpt = TrainCheckpoint.for_run(cfg, ws, worker=distribute.worker_index())
        ckpt.prepare_history(ckpt.completed_epochs())
        print(f"worker {distribute.worker_index()}: {summary}")
        fit(cfg, data, epoch, [], ckpt, dist)
        ckpt.remove()
        return {}
    total = training_phases(cfg)[-1].end_epoch
    with runs.stage_run(cfg, ws, "train") as run_id:
        print(summary)
        runs.log_dataset(cfg, ws)
        runs.log_params_once(
            {
                "train.replicas_in_sync": dist.replicas_in_sync,
                "train.global_batch_size": cfg.train.batch_size * dist.replicas_in_sync,
            }
        )
        ckpt = TrainCheckpoint.for_run(cfg, ws)
        done = ckpt.completed_epochs()
        ckpt.prepare_history(done)
        metrics = epoch_metrics_logger(run_id)
        if done:
            where = f"checkpoint {ckpt.root}"
            if done < total:
                print(f"resuming from epoch {done + 1} of {total}: {where}")
            else:  # trained, then stopped before the end (a tracking server lost)
                print(f"all {done} epochs are in the {where}: finishing the stage")
            metrics.backfill(ckpt.read_history())
        try:
            model, _ = fit(cfg, data, epoch, [metrics], ckpt, dist)
        except DivergedError:
            ckpt.remove()  # a checkpoint of diverged weights must never be resumed
            raise
        with atomic_path(ws.history) as history_tmp:
            shutil.copyfile(ckpt.history, history_tmp)
        with atomic_path(ws.model_file) as model_tmp:
            model.save(model_tmp)
        history = ckpt.read_history()
        save_training_curves(history, ws.training_curves)
        metrics.flush()  # a dead tracking server fails here; the checkpoint stays for the rerun
        ckpt.remove()
        runs.log_artifact_if_exists(ws.history, "train")
        runs.log_artifact_if_exists(ws.training_curves, "train")
    return history


def save_training_curves(history: dict[str, list[float]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, as a static PNG: `dvc plots show`
    embeds it as is, so the curves show offline (its Vega plots load JavaScript from a CDN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, history[metric], marker="o", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
