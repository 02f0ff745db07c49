"""Preprocess stage: what training derives from the training split, and a look at what
the model is fed (images: tasks/images/preprocess.py; text: tasks/text/preprocess.py)."""

from __future__ import annotations

from typing import Any

from tasks.config import PipelineConfig, modality
from tasks.tracking import runs
from tasks.workspace import Workspace, atomic_dir


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """The stage as `dvc repro` and the Prefect flow call it."""
    import mlflow

    if modality(cfg.data.source) == "text":
        from tasks.text.preprocess import preprocess
    else:
        from tasks.images.preprocess import preprocess
    with (
        runs.stage_run(cfg, ws, "preprocess"),
        atomic_dir(ws.preprocessed) as data_dir,
        atomic_dir(ws.preprocess_reports) as report_dir,
    ):
        tags = preprocess(cfg, ws, data_dir, report_dir)
        mlflow.set_tags(tags)
        mlflow.log_artifacts(str(data_dir), artifact_path="preprocess")
        mlflow.log_artifacts(str(report_dir), artifact_path="preprocess")
    return tags
