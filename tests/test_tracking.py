"""One MLflow run per pipeline execution, across stage processes, in a real sqlite store."""

from __future__ import annotations

import mlflow
import pytest

from tasks import tracking
from tasks.config import load_config
from tests.conftest import PARAMS, tiny_overrides


def run_status(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).info.status


def test_stages_share_one_run_until_the_last_closes_it(tiny_cfg, workspace):
    with tracking.stage_run(tiny_cfg, workspace, "data") as first:
        mlflow.log_metric("a", 1.0)
    assert run_status(first) == "RUNNING"
    with tracking.stage_run(tiny_cfg, workspace, "train") as second:
        mlflow.log_metric("b", 2.0)
    with tracking.stage_run(tiny_cfg, workspace, "register", last=True) as third:
        pass
    assert first == second == third
    run = mlflow.MlflowClient().get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"a": 1.0, "b": 2.0}
    assert run.data.params["train.epochs"] == "1"
    assert run.data.tags["pipeline.stage.train"] == "done"
    assert not workspace.run_handle.exists()

    with tracking.stage_run(tiny_cfg, workspace, "train") as next_run:
        pass
    assert next_run != first, "a finished pipeline run is never reopened"


def test_changed_config_opens_a_new_run(tiny_cfg, workspace, tmp_path):
    with tracking.stage_run(tiny_cfg, workspace, "data") as first:
        pass
    changed = load_config(PARAMS, tiny_overrides(tmp_path) | {"train.epochs": 2})
    with tracking.stage_run(changed, workspace, "train") as second:
        pass
    assert first != second
    assert mlflow.MlflowClient().get_run(second).data.params["train.epochs"] == "2"


def test_failing_stage_marks_the_run_failed(tiny_cfg, workspace):
    with (
        pytest.raises(RuntimeError, match="boom"),
        tracking.stage_run(tiny_cfg, workspace, "train") as run_id,
    ):
        raise RuntimeError("boom")
    assert run_status(run_id) == "FAILED"
    assert not workspace.run_handle.exists()
    assert mlflow.active_run() is None


def test_environment_tracking_uri_wins(tiny_cfg, workspace, tmp_path, monkeypatch):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert tracking.tracking_uri(tiny_cfg.mlflow, workspace.root) == other


def test_relative_sqlite_uri_resolves_against_the_workspace(workspace):
    cfg = load_config(PARAMS)
    uri = tracking.tracking_uri(cfg.mlflow, workspace.root)
    assert uri == f"sqlite:///{workspace.root.resolve() / 'mlruns' / 'mlflow.db'}"
