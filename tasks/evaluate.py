"""Evaluate stage: test-set metrics for the trained model.

Writes reports/metrics.json (the headline numbers, DVC metrics) and reports/evaluate/
(what the data's modality adds: for images per_class.json, predictions.csv (a DVC
confusion plot) and confusion_matrix.png, made by the functions below; for text
generated samples, tasks/text/modality.py), and logs them to the pipeline's MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks import modality, models, tracking
from tasks.config import PipelineConfig
from tasks.errors import refuse_non_finite
from tasks.images import augment
from tasks.workspace import Workspace, atomic_dir, atomic_path, write_json


def predict_logits(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    stats: augment.NormStats,
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


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """Flat metric names for MLflow: test_accuracy, test_f1_<class>, ..."""
    flat = {f"test_{key}": value for key, value in metrics["test"].items()}
    for name, scores in metrics["per_class"].items():
        safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
        for score in ("precision", "recall", "f1"):
            flat[f"test_{score}_{safe}"] = scores[score]
    return flat


def champion_margin(model_name: str, headline: dict[str, float]) -> dict[str, Any]:
    """``{"previous_champion": {"version", "accuracy_margin"}}``: this model's test accuracy
    minus the champion's of when evaluate ran, as registered (the number the registry
    promotes by; the register stage re-evaluates the champion when its data version
    differs); empty without one. "previous": register may promote this model, and `dvc
    metrics show` must not read as if that version were still the champion."""
    import mlflow

    from tasks.tracking import registry

    client = mlflow.MlflowClient()
    champion = registry.alias_version(client, model_name, "champion")
    recorded = champion and registry.recorded_accuracy(client, champion)
    if recorded is None:
        return {}
    margin = headline["accuracy"] - recorded
    version = int(champion.version)
    return {"previous_champion": {"version": version, "accuracy_margin": round(margin, 6)}}


def run(cfg: PipelineConfig, ws: Workspace) -> dict:
    """The stage as `dvc repro` and the Prefect flow call it."""
    import mlflow

    model = models.load_model_file(ws.model_file)  # inference only, safe mode
    with tracking.stage_run(cfg, ws, "evaluate"), atomic_dir(ws.evaluation) as details:
        headline, logged = modality.for_config(cfg).evaluate(cfg, ws, model, details)
        refuse_non_finite(headline, "evaluate")
        summary = {"test": headline} | champion_margin(cfg.register.model_name, headline)
        write_json(ws.metrics, summary)  # `dvc metrics show`: headline only
        mlflow.log_metrics(logged)
        mlflow.log_artifact(str(ws.metrics), artifact_path="evaluate")
        mlflow.log_artifacts(str(details), artifact_path="evaluate")
    return {"test": headline}
