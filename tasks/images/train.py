"""The train stage's image part: DALI batches, one pipeline per shard."""

from __future__ import annotations

from typing import Any

from tasks.config import PipelineConfig
from tasks.images import augment
from tasks.images.feeding import (
    NormStats,
    dataset_stats,
    model_input_shape,
    model_stats,
    resize_args,
)
from tasks.modality import TrainingData
from tasks.prepared import Split, load_meta, load_split
from tasks.workspace import Workspace


def image_training_data(
    cfg: PipelineConfig,
    train_split: Split,
    val_split: Split,
    num_classes: int,
    stats: NormStats,
    epoch: Any,
) -> TrainingData:
    """Augmented, reshuffled per (seed, epoch) for training; in order for validation;
    resized to the model's input where it differs."""
    images, labels = train_split
    shape = tuple(images.shape[1:])
    batches = {
        "stats": model_stats(cfg, stats),
        "batch_size": cfg.train.batch_size,
        "preprocess": cfg.preprocess,
        **resize_args(cfg, shape),
    }
    return TrainingData(
        train=lambda shard: augment.dali_dataset(
            images, labels, train=True, seed=cfg.train.seed, epoch=epoch, shard=shard, **batches
        ),
        val=lambda shard: augment.dali_dataset(*val_split, train=False, shard=shard, **batches),
        input_shape=model_input_shape(cfg, shape),
        outputs=num_classes,
        train_examples=len(images),
    )


def training_data(cfg: PipelineConfig, ws: Workspace, epoch: Any) -> TrainingData:
    return image_training_data(
        cfg,
        load_split(ws.prepared, "train"),
        load_split(ws.prepared, "val"),
        load_meta(ws.prepared)["num_classes"],
        dataset_stats(ws),
        epoch,
    )
