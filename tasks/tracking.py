"""One MLflow run per pipeline execution, shared by stages in separate processes.

`dvc repro` runs each stage as its own process, so the run id travels in a small
handle file (``.pipeline/mlflow_run.json``). A stage joins the run named there when
that run is still open and was opened for the same resolved config; otherwise it opens
a new one. The register stage closes the run, so the next `dvc repro` (which may rerun
only train, evaluate and register) gets a fresh run. The Prefect flow always opens a
new run first, and its stages join it the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.config import MlflowConfig, PipelineConfig
from tasks.workspace import Workspace, read_json, write_json

TRACKING_ENV = "MLFLOW_TRACKING_URI"


def tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path in params.yaml is taken from ``root``."""
    uri = os.environ.get(TRACKING_ENV) or cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        db_path = (root / uri[len(prefix) :]).resolve()
        db_path.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db_path)
    return uri


def configure(cfg: PipelineConfig, ws: Workspace) -> str:
    """Point MLflow at the configured store and make sure the experiment exists."""
    import mlflow

    uri = tracking_uri(cfg.mlflow, ws.root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(cfg.mlflow.experiment) is None:
        artifacts = ws.resolve(cfg.mlflow.artifact_root).resolve()
        try:
            client.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts.as_uri())
        except mlflow.exceptions.MlflowException:
            # Another process created it between our lookup and create; theirs is as good.
            if client.get_experiment_by_name(cfg.mlflow.experiment) is None:
                raise
    return uri


def config_digest(cfg: PipelineConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.flat(), sort_keys=True).encode()).hexdigest()[:16]


def git_commit(root: Path) -> str:
    """HEAD's commit, with ``-dirty`` when tracked files differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def start_pipeline_run(cfg: PipelineConfig, ws: Workspace, run_name: str | None = None) -> str:
    """Open a new pipeline run, log the resolved config, and write the handle file."""
    import mlflow

    uri = configure(cfg, ws)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    run = client.create_run(
        experiment.experiment_id,
        run_name=run_name,
        tags={
            "pipeline.git_commit": git_commit(ws.root),
            "pipeline.dataset": cfg.data.name if cfg.data.source == "tfds" else "synthetic",
            "pipeline.config_digest": config_digest(cfg),
        },
    )
    run_id = run.info.run_id
    client.log_batch(
        run_id,
        params=[mlflow.entities.Param(k, str(v)) for k, v in sorted(cfg.flat().items())],
    )
    client.log_dict(run_id, cfg.model_dump(), "config/resolved_params.json")
    write_json(
        ws.run_handle,
        {"run_id": run_id, "tracking_uri": uri, "config_digest": config_digest(cfg)},
    )
    return run_id


def _joinable_run(cfg: PipelineConfig, ws: Workspace, uri: str) -> str | None:
    import mlflow

    if not ws.run_handle.is_file():
        return None
    handle = read_json(ws.run_handle)
    if handle.get("tracking_uri") != uri or handle.get("config_digest") != config_digest(cfg):
        return None
    try:
        run = mlflow.MlflowClient().get_run(handle["run_id"])
    except mlflow.exceptions.MlflowException:
        return None
    return run.info.run_id if run.info.status == "RUNNING" else None


@contextmanager
def stage_run(
    cfg: PipelineConfig, ws: Workspace, stage: str, *, last: bool = False
) -> Iterator[str]:
    """Make the pipeline run the active MLflow run while one stage executes.

    The run stays RUNNING between stages and ends FINISHED after the ``last`` stage;
    a failing stage marks it FAILED and drops the handle so the next attempt starts clean.
    """
    import mlflow

    uri = configure(cfg, ws)
    run_id = _joinable_run(cfg, ws, uri)
    joined = run_id is not None
    run_id = run_id or start_pipeline_run(cfg, ws)
    mlflow.start_run(run_id=run_id)
    if not joined:
        # Upstream stages were up to date and did not run: show their outputs here too,
        # so every pipeline run carries the data description and augmentation grid.
        log_artifact_if_exists(ws.prepared / "meta.json", "data")
        log_artifact_if_exists(ws.norm_stats, "preprocess")
        log_artifact_if_exists(ws.augmented_grid, "preprocess")
    try:
        yield run_id
    except BaseException:
        mlflow.set_tag(f"pipeline.stage.{stage}", "failed")
        mlflow.end_run(status="FAILED")
        ws.run_handle.unlink(missing_ok=True)
        raise
    mlflow.set_tag(f"pipeline.stage.{stage}", "done")
    if last:
        mlflow.end_run(status="FINISHED")
        ws.run_handle.unlink(missing_ok=True)
    else:
        mlflow.end_run(status="RUNNING")


def log_artifact_if_exists(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    if path.is_file():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def run_url(run_id: str) -> dict[str, Any]:
    """Where to find the run: the tracking URI plus experiment and run ids for the UI."""
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    return {
        "tracking_uri": mlflow.get_tracking_uri(),
        "experiment_id": run.info.experiment_id,
        "run_id": run_id,
        "ui_path": f"#/experiments/{run.info.experiment_id}/runs/{run_id}",
    }
