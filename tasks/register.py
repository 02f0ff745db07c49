"""Register stage: log the model to MLflow, register a version, move the aliases.

The registered model takes raw pixels (its first layer holds the normalization
stats), so a registry consumer needs nothing from this repository. Every version is
tagged with what made it: git commit, DVC hash of the dataset, resolved params, run id.
Alias ``challenger`` always points at the newest version; ``champion`` moves to it only
when there is no champion yet or it beats the champion's test accuracy by the margin.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tasks import data, tracking
from tasks.config import PipelineConfig
from tasks.models import with_normalization
from tasks.workspace import Workspace, read_json, write_json

CHAMPION = "champion"
CHALLENGER = "challenger"


def dvc_hash(path: Path) -> str:
    """The md5 DVC records for this output in dvc.lock (``<md5>.dir`` for a directory)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5")
    return obj.hash_info.value


def should_promote(candidate: float, champion: float | None, margin: float) -> bool:
    """Promote when there is no champion, or the candidate is better by at least ``margin``.

    A tie never promotes, so rerunning identical params does not churn the alias.
    """
    if champion is None:
        return True
    improvement = candidate - champion
    return improvement > 0 and improvement >= margin


def champion_accuracy(client: Any, model_name: str) -> tuple[str | None, float | None]:
    import mlflow

    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None, None
    accuracy = version.tags.get("test_accuracy")
    if accuracy is None:  # registered by something else: fall back to its run's metric
        accuracy = client.get_run(version.run_id).data.metrics.get("test_accuracy")
    return str(version.version), None if accuracy is None else float(accuracy)


def log_and_register(
    cfg: PipelineConfig, ws: Workspace, run_id: str, test_accuracy: float
) -> dict[str, Any]:
    import keras
    import mlflow
    from mlflow.models import infer_signature

    stats = read_json(ws.norm_stats)
    raw_model = with_normalization(
        keras.models.load_model(ws.model_file, compile=False),
        stats["mean"],
        stats["std"],
        tta_flip=cfg.evaluate.tta_flip,
    )
    images, _ = data.load_split(ws.prepared, "test")
    example = images[:4].astype("float32")  # raw pixels, 0..255
    signature = infer_signature(example, raw_model.predict(example, verbose=0))
    # The TensorFlow flavor, which wraps Keras 3 models: mlflow 3.17's keras flavor writes
    # the input example before creating the model directory and fails.
    info = mlflow.tensorflow.log_model(
        raw_model,
        name="model",
        signature=signature,
        input_example=example,
        registered_model_name=cfg.register.model_name,
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {
        "git_commit": tracking.git_commit(ws.root),
        "data_version": dvc_hash(ws.prepared),
        "params": json.dumps(cfg.flat(), sort_keys=True),
        "run_id": run_id,
        "test_accuracy": repr(test_accuracy),
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.register.model_name, version, key, value)

    previous_version, previous_accuracy = champion_accuracy(client, cfg.register.model_name)
    promoted = should_promote(test_accuracy, previous_accuracy, cfg.register.promote_margin)
    client.set_registered_model_alias(cfg.register.model_name, CHALLENGER, version)
    if promoted:
        client.set_registered_model_alias(cfg.register.model_name, CHAMPION, version)
    champion = version if promoted else previous_version
    return {
        "model_name": cfg.register.model_name,
        "version": version,
        "model_uri": f"models:/{cfg.register.model_name}/{version}",
        "aliases": [CHALLENGER, CHAMPION] if promoted else [CHALLENGER],
        "promoted": promoted,
        "champion_version": champion,
        "previous_champion": {"version": previous_version, "test_accuracy": previous_accuracy},
        "test_accuracy": test_accuracy,
        "run_id": run_id,
        "git_commit": tags["git_commit"],
        "data_version": tags["data_version"],
    }


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """The stage as `dvc repro` and the Prefect flow call it; closes the pipeline run."""
    import mlflow

    metrics = read_json(ws.metrics)
    with tracking.stage_run(cfg, ws, "register", last=True) as run_id:
        record = log_and_register(cfg, ws, run_id, metrics["test"]["accuracy"])
        record["mlflow"] = tracking.run_url(run_id)
        write_json(ws.registration, record)
        mlflow.log_artifact(str(ws.registration), artifact_path="register")
        mlflow.set_tags(
            {"registered.version": record["version"], "registered.promoted": record["promoted"]}
        )
    return record
