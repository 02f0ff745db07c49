"""The evaluate stage's image part: classification metrics on the test split through the
DALI evaluation pipeline; reports/evaluate/ gets per_class.json, predictions.csv (a DVC
confusion plot) and confusion_matrix.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import PipelineConfig
from tasks.images import augment
from tasks.images.feeding import NormStats, dataset_stats, model_stats, resize_args
from tasks.prepared import load_meta, load_split
from tasks.workspace import Workspace, atomic_path, write_json


def evaluate(cfg: PipelineConfig, ws: Workspace, model: Any, out_dir: Path) -> dict[str, float]:
    """Write the details into ``out_dir`` (per-class scores among them: an artifact, not
    3 x classes single-value charts in the MLflow UI); return the headline metrics
    (``accuracy``: the number the registry compares)."""
    meta = load_meta(ws.prepared)
    images, labels = load_split(ws.prepared, "test")
    stats = model_stats(cfg, dataset_stats(ws))
    logits = predict_logits(model, images, labels, stats, cfg, **resize_args(cfg, images.shape[1:]))
    metrics = compute_metrics(logits, labels, meta["class_names"])
    predicted = logits.argmax(axis=1)
    names = meta["class_names"]
    save_confusion_matrix(labels, predicted, names, out_dir / ws.confusion_png.name)
    write_predictions(labels, predicted, names, out_dir / ws.predictions.name)
    write_json(out_dir / ws.per_class.name, metrics["per_class"])
    return metrics["test"]


def predict_logits(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    stats: NormStats,
    cfg: PipelineConfig,
    **resize: Any,
) -> np.ndarray:
    """Logits for every test image, in order, through the DALI evaluation pipeline.

    With evaluate.tta_flip, the mean of the logits for each image and its mirror.
    """
    dataset = augment.dali_dataset(
        images,
        labels,
        stats=stats,
        batch_size=cfg.evaluate.batch_size,
        train=False,
        preprocess=cfg.preprocess,
        **resize,  # input_shape: the model's, when it differs from the images'
    )
    logits = model.predict(dataset, verbose=0)
    if cfg.evaluate.tta_flip:  # same averaging as models.with_normalization(tta_flip=True)
        import tensorflow as tf

        mirrored = dataset.map(lambda x, y: (tf.reverse(x, axis=[2]), y))
        logits = (logits + model.predict(mirrored, verbose=0)) / 2
    if len(logits) != len(labels):
        raise RuntimeError(f"got {len(logits)} predictions for {len(labels)} test images")
    return logits


def compute_metrics(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, mean cross-entropy and per-class precision/recall/F1 from logits."""
    from sklearn.metrics import precision_recall_fscore_support

    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    predicted = logits.argmax(axis=1)
    classes = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    return {
        "test": {
            "accuracy": float((predicted == labels).mean()),
            "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "macro_f1": float(f1.mean()),
        },
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def save_confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, class_names: list[str], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(6.0, 0.5 * len(class_names))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        labels,
        predicted,
        labels=list(range(len(class_names))),
        display_labels=class_names,
        ax=ax,
        colorbar=False,
        xticks_rotation="vertical",
        include_values=len(class_names) <= 20,
    )
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_predictions(labels: np.ndarray, predicted: np.ndarray, names: list[str], path: Path):
    lines = ["actual,predicted"]
    lines += [f"{names[a]},{names[p]}" for a, p in zip(labels, predicted, strict=True)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
