"""The image modality: uint8 NHWC arrays, DALI augmentation, classifiers.

The stages' image-specific work, behind the `tasks.modality.Modality` interface: the
data stage's sources (TFDS, IDX, synthetic), normalization stats and the augmented grid,
DALI batches for training and evaluation, classification metrics, and the raw-pixel
model a version serves. Models whose input differs from the data (a transfer base at
model.input_size, RGB from grayscale) get it from the DALI pipeline while training and
from stock Keras layers inside the registered model (models.with_normalization).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks import data, models
from tasks.config import PipelineConfig, dataset_identity
from tasks.images import augment
from tasks.modality import ServedModel, TrainingData
from tasks.workspace import Workspace, read_json, write_json

CLASSIFIER_KERAS_ARTIFACT = "keras_model"  # the name classifier_model.py loads it by


def model_input_shape(cfg: PipelineConfig, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    return models.input_shape_for(cfg.model, data_shape)


def model_stats(cfg: PipelineConfig, stats: augment.NormStats) -> augment.NormStats:
    """What DALI normalizes with: the dataset's stats, or none (mean 0, std 1) for a model
    that normalizes raw pixels itself (a transfer base's preprocess_input)."""
    if models.normalizes_itself(cfg.model):
        return augment.NormStats(mean=[0.0] * 3, std=[1.0] * 3)
    return stats


def _resize_args(cfg: PipelineConfig, data_shape: tuple[int, ...]) -> dict[str, Any]:
    """DALI resizes (and expands gray to RGB) to the model's input inside the pipeline."""
    return {"input_shape": model_input_shape(cfg, data_shape)}


def image_training_data(
    cfg: PipelineConfig,
    train_split: data.Split,
    val_split: data.Split,
    num_classes: int,
    stats: augment.NormStats,
    epoch: Any,
) -> TrainingData:
    """DALI batches, one pipeline per shard: augmented, reshuffled per (seed, epoch) for
    training; in order for validation; resized to the model's input where it differs."""
    images, labels = train_split
    shape = tuple(images.shape[1:])
    batches = {
        "stats": model_stats(cfg, stats),
        "batch_size": cfg.train.batch_size,
        "preprocess": cfg.preprocess,
        **_resize_args(cfg, shape),
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


def _stats(ws: Workspace) -> augment.NormStats:
    return augment.NormStats(**read_json(ws.norm_stats))


class ImageModality:
    name = "image"

    def prepare(self, cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
        dataset = data.prepare_dataset(cfg.data, ws.root)
        return data.write_prepared(dataset, ws.prepared, cfg.data)

    def preprocess(
        self, cfg: PipelineConfig, ws: Workspace, data_dir: Path, report_dir: Path
    ) -> dict[str, Any]:
        meta = data.load_meta(ws.prepared)
        images, labels = data.load_split(ws.prepared, "train")
        stats = augment.channel_stats(images)
        count = min(cfg.preprocess.grid_samples, len(images))
        # The grid only illustrates; a fixed seed keeps it comparable across runs.
        shown = model_stats(cfg, stats)
        samples = augment.sample_augmented(
            images, shown, cfg.preprocess, count, seed=0, **_resize_args(cfg, images.shape[1:])
        )
        augment.save_image_grid(
            samples,
            shown.mean,
            shown.std,
            report_dir / ws.augmented_grid.name,
            meta["class_names"],
            labels[:count],
        )
        write_json(data_dir / ws.norm_stats.name, stats._asdict())
        return {"preprocess.device": augment.resolve_device(cfg.preprocess.device)}

    def training_data(self, cfg: PipelineConfig, ws: Workspace, epoch: Any) -> TrainingData:
        return image_training_data(
            cfg,
            data.load_split(ws.prepared, "train"),
            data.load_split(ws.prepared, "val"),
            data.load_meta(ws.prepared)["num_classes"],
            _stats(ws),
            epoch,
        )

    def evaluate(
        self, cfg: PipelineConfig, ws: Workspace, model: Any, out_dir: Path
    ) -> tuple[dict[str, float], dict[str, float]]:
        from tasks import evaluate

        meta = data.load_meta(ws.prepared)
        images, labels = data.load_split(ws.prepared, "test")
        stats = model_stats(cfg, _stats(ws))
        logits = evaluate.predict_logits(
            model, images, labels, stats, cfg, **_resize_args(cfg, images.shape[1:])
        )
        metrics = evaluate.compute_metrics(logits, labels, meta["class_names"])
        predicted = logits.argmax(axis=1)
        names = meta["class_names"]
        evaluate.save_confusion_matrix(labels, predicted, names, out_dir / ws.confusion_png.name)
        evaluate.write_predictions(labels, predicted, names, out_dir / ws.predictions.name)
        write_json(out_dir / ws.per_class.name, metrics["per_class"])
        return metrics["test"], evaluate.mlflow_metrics(metrics)

    def served_model(self, cfg: PipelineConfig, ws: Workspace, scratch: Path) -> ServedModel:
        """A raw-pixel Keras model (normalization, and any resize to the model's input,
        inside it) behind tasks/serving/classifier_model.py."""
        from tasks.models import load_model_file, with_normalization
        from tasks.tracking.registry import binding_of

        stats = model_stats(cfg, _stats(ws))
        meta = data.load_meta(ws.prepared)
        raw_model = with_normalization(
            load_model_file(ws.model_file),
            stats.mean,
            stats.std,
            tta_flip=cfg.evaluate.tta_flip,
            data_shape=tuple(meta["image_shape"]),
        )
        keras_file = scratch / "model.keras"
        raw_model.save(keras_file)
        images, _ = data.load_split(ws.prepared, "test")
        identity = dataset_identity(cfg.data.source, cfg.data.name, cfg.data.classes)
        return ServedModel(
            code=Path(__file__).resolve().parents[1] / "serving" / "classifier_model.py",
            artifacts={CLASSIFIER_KERAS_ARTIFACT: keras_file},
            model_config={"class_names": list(meta["class_names"])},
            input_example=images[:2].astype("float32"),  # raw pixels, 0..255
            binding=binding_of(identity, meta["image_shape"], meta["class_names"]),
            reevaluate=lambda version: self._accuracy_of(cfg, ws, version),
        )

    @staticmethod
    def _accuracy_of(cfg: PipelineConfig, ws: Workspace, version: str) -> float:
        """A registered version (raw pixels in) on this run's test set."""
        from tasks.tracking import registry

        images, labels = data.load_split(ws.prepared, "test")
        model = registry.load_version(cfg.register.model_name, version)
        logits = model.predict(
            images.astype("float32"), batch_size=cfg.evaluate.batch_size, verbose=0
        )
        return float((logits.argmax(axis=1) == labels).mean())

    def export_samples(self, cfg: PipelineConfig, ws: Workspace) -> tuple[Any, Any, Any]:
        from tasks.serving.formats import REPRESENTATIVE_IMAGES

        count = cfg.export.parity_samples
        test_images, test_labels = data.load_split(ws.prepared, "test")
        train_images, _ = data.load_split(ws.prepared, "train")
        pixels = np.asarray(test_images[:count], dtype="float32")
        return pixels, test_labels[:count], train_images[:REPRESENTATIVE_IMAGES]
