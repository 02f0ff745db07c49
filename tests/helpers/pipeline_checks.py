"""Assertions both end-to-end tests make on what one pipeline run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.workspace import Workspace

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


def check_pipeline_run(client, run, *, epochs: int, model_name: str, ws: Workspace) -> dict:
    """The run has params, per-epoch and test metrics, plots, the model; returns registration."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == str(epochs)
    assert params["data.source"] == "synthetic"
    assert params["model.name"] == "seed_cnn"
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(epochs)), name
    metrics = json.loads(ws.metrics.read_text())
    assert run.data.metrics["test_accuracy"] == metrics["test"]["accuracy"]
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert sum(len(group) for group in metrics.values()) <= 8, "headline only (dvc metrics show)"
    per_class = json.loads(ws.per_class.read_text())
    assert len(per_class) == 10
    assert {"precision", "recall", "f1", "support"} <= set(per_class["class_0"])

    artifacts = artifact_paths(client, run.info.run_id)
    for expected in (
        "config/resolved_params.json",
        "preprocess/augmented_samples.png",
        "preprocess/norm_stats.json",
        "evaluate/confusion_matrix.png",
        "evaluate/metrics.json",
        "evaluate/per_class.json",
        "train/history.csv",
        "train/training_curves.png",
        "register/registration.json",
        "exports/parity.json",
        "exports/saved_model/saved_model.pb",
    ):
        assert expected in artifacts, f"{expected} not among {sorted(artifacts)}"
    for png in (ws.augmented_grid, ws.confusion_png, ws.training_curves):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    registration = json.loads(ws.registration.read_text())
    assert registration["run_id"] == run.info.run_id
    version = client.get_model_version(model_name, registration["version"])
    assert version.run_id == run.info.run_id
    assert version.tags["run_id"] == run.info.run_id
    assert json.loads(version.tags["params"])["train.epochs"] == epochs
    assert version.tags["data_version"].endswith(".dir")
    assert float(version.tags["test_accuracy"]) == metrics["test"]["accuracy"]
    exported = json.loads(version.tags["export.saved_model"])  # the export stage's listing
    assert exported["artifact"] == f"runs:/{run.info.run_id}/exports/saved_model"
    assert exported["max_abs_diff"] <= 1e-4 and exported["top1_agreement"] == 1.0
    info = mlflow.models.get_model_info(f"models:/{model_name}/{version.version}")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 32, 32, 3)
    return registration


def read_registration(root: Path) -> dict:
    return json.loads(Workspace(root).registration.read_text())
