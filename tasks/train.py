"""Train stage: fit the configured Keras model on DALI-augmented batches.

Reads data/prepared and the preprocess stage's normalization stats; writes
models/model.keras and reports/history.csv (per-epoch metrics, a DVC plot). Per-epoch
metrics also go to the pipeline's MLflow run, at step = epoch. A checkpoint after each
epoch lets a rerun after a crash resume where it stopped (tasks/checkpoint.py).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tasks import augment, data, recipe, tracking
from tasks.checkpoint import TrainCheckpoint, epoch_metrics_logger
from tasks.config import PipelineConfig
from tasks.models import build_model
from tasks.workspace import Workspace, atomic_path, read_json


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
    cfg: PipelineConfig, input_shape: tuple[int, int, int], num_classes: int, steps: int
) -> Any:
    """Build and compile the model under the resolved precision policy and XLA setting.

    The global dtype policy is set only while the layers are created (they keep it), so
    nothing else in the process, evaluation included, inherits it.
    """
    import keras

    device = augment.resolve_device(cfg.preprocess.device)
    xla = recipe.resolve_xla(cfg.train.xla, device)
    seed_everything(cfg.train.seed, deterministic_ops=not xla)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(recipe.resolve_precision(cfg.train.precision, device))
    try:
        model = build_model(cfg.model.name, input_shape, num_classes, tuple(cfg.model.widths))
    finally:
        keras.config.set_dtype_policy(previous)
    return recipe.compile_model(model, cfg.train, steps, xla=xla)


def train_model(
    cfg: PipelineConfig,
    train_split: tuple[np.ndarray, np.ndarray],
    val_split: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    stats: augment.NormStats,
    callbacks: list[Any] | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Build, compile and fit the model; return it with its per-epoch history.

    The training order of each epoch is a function of (seed, epoch), told to the data
    pipeline at each epoch's start: a run resumed from a checkpoint (BackupAndRestore in
    ``callbacks``) sees the same batches from there on as an unbroken run.
    """
    import keras
    import tensorflow as tf

    images, labels = train_split
    steps = math.ceil(len(images) / cfg.train.batch_size)
    model = build_for_training(cfg, tuple(images.shape[1:]), num_classes, steps)
    batches = {"stats": stats, "batch_size": cfg.train.batch_size, "preprocess": cfg.preprocess}
    with tf.device("/cpu:0"):
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    train_ds = augment.dali_dataset(
        images, labels, train=True, seed=cfg.train.seed, epoch=epoch, **batches
    )
    clock = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epoch.assign(e))
    val_ds = augment.dali_dataset(*val_split, train=False, **batches)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.train.epochs,
        callbacks=[clock, *(callbacks or [])],
        shuffle=False,  # dali_dataset reshuffles every epoch itself
        verbose=2,
    )
    return model, {key: [float(v) for v in values] for key, values in history.history.items()}


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, list[float]]:
    """The stage as `dvc repro` and the Prefect flow call it."""
    meta = data.load_meta(ws.prepared)
    stats = augment.NormStats(**read_json(ws.norm_stats))
    train_split = data.load_split(ws.prepared, "train")
    val_split = data.load_split(ws.prepared, "val")
    with tracking.stage_run(cfg, ws, "train") as run_id:
        ckpt = TrainCheckpoint.for_run(cfg, ws)
        done = ckpt.completed_epochs()
        ckpt.prepare_history(done)
        metrics = epoch_metrics_logger(run_id)
        if done:
            where = f"checkpoint {ckpt.root}"
            if done < cfg.train.epochs:
                print(f"resuming from epoch {done + 1} of {cfg.train.epochs}: {where}")
            else:  # trained, then stopped before the end (a tracking server lost)
                print(f"all {done} epochs are in the {where}: finishing the stage")
            metrics.backfill(ckpt.read_history())
        model, _ = train_model(
            cfg,
            train_split,
            val_split,
            meta["num_classes"],
            stats,
            [metrics, *ckpt.callbacks()],
        )
        with atomic_path(ws.history) as history_tmp:
            shutil.copyfile(ckpt.history, history_tmp)
        with atomic_path(ws.model_file) as model_tmp:
            model.save(model_tmp)
        history = ckpt.read_history()
        save_training_curves(history, ws.training_curves)
        metrics.flush()  # a dead tracking server fails here; the checkpoint stays for the rerun
        ckpt.remove()
        tracking.log_artifact_if_exists(ws.history, "train")
        tracking.log_artifact_if_exists(ws.training_curves, "train")
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
