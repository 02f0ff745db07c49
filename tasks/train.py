"""Train stage: fit the configured Keras model on DALI-augmented batches.

Reads data/prepared and the preprocess stage's normalization stats; writes
models/model.keras and reports/history.csv (per-epoch metrics, a DVC plot). Per-epoch
metrics also go to the pipeline's MLflow run through MLflow's own Keras callback.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks import augment, data, tracking
from tasks.config import PipelineConfig, TrainConfig
from tasks.models import build_model
from tasks.workspace import Workspace, atomic_path, read_json


def seed_everything(seed: int) -> None:
    """Same seed, same data, same params -> same metrics on CPU (op determinism on)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def make_optimizer(cfg: TrainConfig) -> Any:
    import keras

    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=cfg.learning_rate, momentum=0.9, nesterov=True)
    return keras.optimizers.Adam(learning_rate=cfg.learning_rate)


def compile_model(model: Any, cfg: TrainConfig) -> Any:
    import keras

    model.compile(
        optimizer=make_optimizer(cfg),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_model(
    cfg: PipelineConfig,
    train_split: tuple[np.ndarray, np.ndarray],
    val_split: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    stats: augment.NormStats,
    callbacks: list[Any] | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Build, compile and fit the model; return it with its per-epoch history."""
    seed_everything(cfg.train.seed)
    images, labels = train_split
    model = compile_model(
        build_model(cfg.model.name, tuple(images.shape[1:]), num_classes), cfg.train
    )
    batches = {"stats": stats, "batch_size": cfg.train.batch_size, "preprocess": cfg.preprocess}
    train_ds = augment.dali_dataset(images, labels, train=True, seed=cfg.train.seed, **batches)
    val_ds = augment.dali_dataset(*val_split, train=False, **batches)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.train.epochs,
        callbacks=callbacks,
        shuffle=False,  # dali_dataset reshuffles every epoch itself
        verbose=2,
    )
    return model, {key: [float(v) for v in values] for key, values in history.history.items()}


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, list[float]]:
    """The stage as `dvc repro` and the Prefect flow call it."""
    import keras
    from mlflow.keras import MlflowCallback

    meta = data.load_meta(ws.prepared)
    stats = augment.NormStats(**read_json(ws.norm_stats))
    train_split = data.load_split(ws.prepared, "train")
    val_split = data.load_split(ws.prepared, "val")
    with tracking.stage_run(cfg, ws, "train"):
        with atomic_path(ws.history) as history_tmp:
            callbacks = [MlflowCallback(), keras.callbacks.CSVLogger(str(history_tmp))]
            model, history = train_model(
                cfg, train_split, val_split, meta["num_classes"], stats, callbacks
            )
            with atomic_path(ws.model_file) as model_tmp:
                model.save(model_tmp)
        tracking.log_artifact_if_exists(ws.history, "train")
    return history
