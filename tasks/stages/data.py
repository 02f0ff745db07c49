"""Data stage: data/prepared/ (tasks/prepared.py) from the configured source, as a whole.

Images: tasks/images/data.py (TFDS, IDX files, synthetic); text: tasks/text/data.py.
"""

from __future__ import annotations

from typing import Any

from tasks.config import PipelineConfig, modality
from tasks.tracking import registry, runs
from tasks.workspace import Workspace


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """The stage as `dvc repro` and the Prefect flow call it; returns meta.json's content."""
    import mlflow

    if modality(cfg.data.source) == "text":
        from tasks.text.data import prepare
    else:
        from tasks.images.data import prepare
    registry.check_binding(cfg, ws)  # before any work, and before a run is opened
    with runs.stage_run(cfg, ws, "data"):
        meta = prepare(cfg, ws)
        mlflow.log_artifact(str(ws.prepared / "meta.json"), artifact_path="data")
        runs.log_params_once(runs.data_size_params(meta))
    return meta
