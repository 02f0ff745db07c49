"""Evaluate stage: test-set metrics for the trained model.

Writes reports/metrics.json (the headline numbers, DVC metrics) and reports/evaluate/
(what the data's modality adds: tasks/images/evaluate.py, tasks/text/evaluate.py), and
logs them to the pipeline's MLflow run.
"""

from __future__ import annotations

from typing import Any

from tasks.config import PipelineConfig, modality
from tasks.errors import refuse_non_finite
from tasks.models.files import load_model_file
from tasks.tracking import runs
from tasks.workspace import Workspace, atomic_dir, write_json


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

    if modality(cfg.data.source) == "text":
        from tasks.text.evaluate import evaluate
    else:
        from tasks.images.evaluate import evaluate
    model = load_model_file(ws.model_file)  # inference only, safe mode
    with runs.stage_run(cfg, ws, "evaluate"), atomic_dir(ws.evaluation) as details:
        headline = evaluate(cfg, ws, model, details)
        refuse_non_finite(headline, "evaluate")
        summary = {"test": headline} | champion_margin(cfg.register.model_name, headline)
        write_json(ws.metrics, summary)  # `dvc metrics show`: headline only
        mlflow.log_metrics(runs.test_metrics(headline))  # the UI's `test` chart section
        mlflow.log_artifact(str(ws.metrics), artifact_path="evaluate")
        mlflow.log_artifacts(str(details), artifact_path="evaluate")
    return {"test": headline}
