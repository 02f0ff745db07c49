"""The register stage's image part: the version a registry consumer loads, a raw-pixel
Keras model (normalization, and any resize to the model's input, inside it) behind
tasks/serving/classifier_model.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig, dataset_identity
from tasks.images.feeding import dataset_stats, model_stats
from tasks.modality import ServedModel
from tasks.models.files import load_model_file
from tasks.models.wrap import with_normalization
from tasks.prepared import load_meta, load_split
from tasks.tracking.registry import binding_of, load_version
from tasks.workspace import Workspace

CLASSIFIER_KERAS_ARTIFACT = "keras_model"  # the name classifier_model.py loads it by
MAX_NAMED_CLASSES = 20  # a description lists at most this many class names
MODEL_CODE = Path(__file__).resolve().parents[1] / "serving" / "classifier_model.py"


def served_model(cfg: PipelineConfig, ws: Workspace, scratch: Path) -> ServedModel:
    stats = model_stats(cfg, dataset_stats(ws))
    meta = load_meta(ws.prepared)
    raw_model = with_normalization(
        load_model_file(ws.model_file),
        stats.mean,
        stats.std,
        tta_flip=cfg.evaluate.tta_flip,
        data_shape=tuple(meta["image_shape"]),
    )
    keras_file = scratch / "model.keras"
    raw_model.save(keras_file)
    images, _ = load_split(ws.prepared, "test")
    identity = dataset_identity(cfg.data.source, cfg.data.name, cfg.data.classes)
    names = list(meta["class_names"])
    shape = ", ".join(map(str, meta["image_shape"]))
    return ServedModel(
        code=MODEL_CODE,
        artifacts={CLASSIFIER_KERAS_ARTIFACT: keras_file},
        model_config={"class_names": names},
        input_example=images[:2].astype("float32"),  # raw pixels, 0..255
        output_schema=output_schema(),
        interface=(
            f"Input: raw pixels, a float32 NHWC batch of shape (N, {shape}) with values "
            "0..255 (the normalization, and any resize, is inside the model). Output: one "
            "row per image: `label`, `class_index`, `score` (its probability) and "
            "`probabilities` by class name."
        ),
        classes=", ".join(names[:MAX_NAMED_CLASSES])
        + (f" and {len(names) - MAX_NAMED_CLASSES} more" if len(names) > MAX_NAMED_CLASSES else ""),
        binding=binding_of(identity, meta["image_shape"], meta["class_names"]),
        reevaluate=lambda version: accuracy_of(cfg, ws, version),
    )


def output_schema() -> Any:
    """What tasks/serving/classifier_model.py answers, one row per image."""
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.long, "class_index"),
            ColSpec(DataType.double, "score"),
            ColSpec(Map(DataType.double), "probabilities"),
        ]
    )


def accuracy_of(cfg: PipelineConfig, ws: Workspace, version: str) -> float:
    """A registered version (raw pixels in) on this run's test set."""
    images, labels = load_split(ws.prepared, "test")
    model = load_version(cfg.register.model_name, version)
    logits = model.predict(images.astype("float32"), batch_size=cfg.evaluate.batch_size, verbose=0)
    return float((logits.argmax(axis=1) == labels).mean())
