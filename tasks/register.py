"""Register stage: log the model to MLflow, register a version, move the aliases.

The registered model takes raw pixels (its first layer holds the normalization
stats), so a registry consumer needs nothing from this repository. Every version is
tagged with what made it: git commit, DVC hash of the dataset, resolved params, run id.
Alias ``challenger`` always points at the newest version; ``champion`` moves to it only
when there is no champion yet or it beats the champion's test accuracy by the margin.
Concurrent pipelines compare and move aliases one at a time (a lock per registry and
model), and a retried stage reuses the version its run already registered.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from tasks import data, tracking
from tasks.config import PipelineConfig
from tasks.models import load_model_file, with_normalization
from tasks.workspace import Workspace, read_json, write_json

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_TIMEOUT_S = 600  # a registration holds the lock for seconds; wait long before giving up


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


def registry_lock(model_name: str) -> Any:
    """A lock shared by every process on this machine that moves ``model_name``'s aliases.

    Keyed by the registry URI and the model name, so two pipelines registering into the
    same registry compare against the champion and move aliases one after the other.
    """
    import mlflow
    from filelock import FileLock

    key = hashlib.sha256(f"{mlflow.get_registry_uri()}|{model_name}".encode()).hexdigest()
    path = Path(tempfile.gettempdir()) / "gpu-train-pipeline-locks" / f"registry-{key[:16]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path, timeout=LOCK_TIMEOUT_S)


def version_of_run(client: Any, model_name: str, run_id: str) -> str | None:
    """The version already registered from ``run_id`` (a retried stage), or None."""
    versions = client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'")
    return str(min(int(v.version) for v in versions)) if versions else None


def log_model(cfg: PipelineConfig, ws: Workspace) -> str:
    """Log the raw-pixel model to the active run, register it; return the new version."""
    import mlflow
    from mlflow.models import infer_signature

    stats = read_json(ws.norm_stats)
    raw_model = with_normalization(
        load_model_file(ws.model_file),
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
        # Stated, not inferred: inference reloads the model in a subprocess (~6 s of ~7).
        pip_requirements=serving_requirements(),
    )
    return str(info.registered_model_version)


def serving_requirements() -> list[str]:
    """What loading the registered model needs: the exact TensorFlow and Keras trained with."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("tensorflow", "keras")]


def move_aliases(
    client: Any, model_name: str, version: str, test_accuracy: float, margin: float
) -> dict[str, Any]:
    """Under the registry lock: challenger -> the newest version, champion -> by the rule.

    Holding the lock across read-compare-write keeps concurrent pipelines from both
    promoting against the same old champion; challenger never moves back to an older
    version when registrations finish out of order.
    """
    with registry_lock(model_name):
        previous_version, previous_accuracy = champion_accuracy(client, model_name)
        promoted = previous_version == version or should_promote(
            test_accuracy, previous_accuracy, margin
        )
        challenger = alias_version(client, model_name, CHALLENGER)
        if challenger is None or int(challenger) <= int(version):
            client.set_registered_model_alias(model_name, CHALLENGER, version)
        if promoted:
            client.set_registered_model_alias(model_name, CHAMPION, version)
    return {
        "promoted": promoted,
        "champion_version": version if promoted else previous_version,
        "previous_champion": {"version": previous_version, "test_accuracy": previous_accuracy},
    }


def alias_version(client: Any, model_name: str, alias: str) -> str | None:
    import mlflow

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def log_and_register(
    cfg: PipelineConfig, ws: Workspace, run_id: str, test_accuracy: float
) -> dict[str, Any]:
    """Register the run's model once (a retry reuses its version), tag it, move aliases."""
    import mlflow

    client = mlflow.MlflowClient()
    name = cfg.register.model_name
    version = version_of_run(client, name, run_id) or log_model(cfg, ws)
    tags = {
        "git_commit": tracking.git_commit(ws.root),
        "data_version": dvc_hash(ws.prepared),
        "params": json.dumps(cfg.flat(), sort_keys=True),
        "run_id": run_id,
        "test_accuracy": repr(test_accuracy),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = move_aliases(client, name, version, test_accuracy, cfg.register.promote_margin)
    return {
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "aliases": [CHALLENGER, CHAMPION] if aliases["promoted"] else [CHALLENGER],
        **aliases,
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
