"""End to end: the Prefect flow under a temporary Prefect server, same records as dvc repro."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.workspace import Workspace, read_json
from tests.helpers.pipeline_checks import check_pipeline_run
from tests.helpers.project import PARAMS, read_mlflow, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_all_stages_and_registers_a_champion(prefect_server, tmp_path):
    import mlflow
    from prefect import get_client

    from flows.pipeline import training_pipeline

    overrides = tiny_overrides(tmp_path)
    state = training_pipeline(
        overrides=overrides, params_path=str(PARAMS), workdir=str(tmp_path), return_state=True
    )
    assert state.is_completed(), state
    record = state.result()
    client, runs = read_mlflow(overrides["mlflow.tracking_uri"], "synthetic")
    assert len(runs) == 1
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(state.state_details.flow_run_id)
    # model, dataset, then the flow run's name: the two UIs point at each other
    assert runs[0].info.run_name == f"seed_cnn-synthetic-{flow_run.name}"
    assert runs[0].data.tags["mlflow.source.name"] == "python -m flows.pipeline"
    ws = Workspace(tmp_path)
    name = "synthetic-seed_cnn"  # register.model_name: auto, on synthetic data
    registration = check_pipeline_run(client, runs[0], epochs=1, model_name=name, ws=ws)
    exports = record.pop("exports")  # the flow returns the registration and the export
    assert registration == record
    assert exports == read_json(ws.parity) and "saved_model" in exports["formats"]
    assert str(client.get_model_version_by_alias("synthetic-seed_cnn", "champion").version) == "1"

    # The registered model takes raw pixels, answers with class names, and agrees with the
    # evaluate stage's predictions.
    from tasks.prepared import load_split

    images, _ = load_split(ws.prepared, "test")
    model = mlflow.pyfunc.load_model("models:/synthetic-seed_cnn@champion")
    served = model.predict(images[:50].astype("float32"))
    rows = ws.predictions.read_text().splitlines()[1:51]
    assert list(served["label"]) == [row.split(",")[1] for row in rows]
    probabilities = np.array([list(p.values()) for p in served["probabilities"]])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert served["score"].tolist() == pytest.approx(probabilities.max(axis=1).tolist())


def test_bad_override_fails_before_any_work(prefect_server, tmp_path):
    """The flow run ends Failed with the config error as its message (no traceback: it
    is the user's to fix); calling the flow raises Prefect's FailedRun with it."""
    from prefect.exceptions import FailedRun

    from flows.pipeline import training_pipeline

    overrides = tiny_overrides(tmp_path) | {"train.epoch": 3}
    with pytest.raises(FailedRun, match=r"unknown config key 'train\.epoch'"):
        training_pipeline(overrides=overrides, params_path=str(PARAMS), workdir=str(tmp_path))
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "mlruns").exists()


def _flaky_train(calls: list, error: BaseException):
    """A train stage that fails once with ``error`` inside the pipeline's MLflow run."""
    from tasks.tracking import runs

    def train(cfg, ws):
        with runs.stage_run(cfg, ws, "train") as run_id:
            calls.append(run_id)
            if len(calls) == 1:
                raise error
        return {"attempts": len(calls)}

    return train


def _run_train_only(tmp_path, monkeypatch, calls, error):
    import flows.pipeline as pipeline

    monkeypatch.setattr(pipeline, "stage_functions", lambda: {"train": _flaky_train(calls, error)})
    monkeypatch.setattr(
        pipeline, "run_stage", pipeline.run_stage.with_options(retry_delay_seconds=0)
    )
    return pipeline.training_pipeline(
        overrides=tiny_overrides(tmp_path),
        params_path=str(PARAMS),
        workdir=str(tmp_path),
        stages=["train"],
        return_state=True,
    )


def _artifacts_of(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_a_transient_stage_failure_is_retried_in_the_same_mlflow_run(
    prefect_server, tmp_path, monkeypatch
):
    calls = []
    state = _run_train_only(tmp_path, monkeypatch, calls, ConnectionRefusedError("restarting"))
    assert state.is_completed(), state
    assert state.result() == {"attempts": 2}
    assert calls[0] == calls[1], "the retry continues the pipeline's MLflow run"
    client, runs = read_mlflow(tiny_overrides(tmp_path)["mlflow.tracking_uri"], "synthetic")
    assert [run.info.run_id for run in runs] == [calls[0]]
    assert runs[0].info.status == "FINISHED"

    artifacts = _artifacts_of(state.state_details.flow_run_id)
    descriptions = sorted(a.description for a in artifacts)
    assert descriptions == [
        "Run summary",
        "train stage log (completed)",
        "train stage log (failed)",
    ]
    summary = next(a for a in artifacts if a.key == "pipeline-summary")
    assert calls[0] in summary.data and "register stage did not run" in summary.data


def test_a_failing_stage_is_not_retried_and_names_itself(prefect_server, tmp_path, monkeypatch):
    from flows.stage import StageFailed

    calls = []
    state = _run_train_only(tmp_path, monkeypatch, calls, ValueError("bad shapes"))
    assert state.is_failed()
    assert len(calls) == 1, "a bug is not retried"
    with pytest.raises(StageFailed, match=r"stage 'train' failed: ValueError: bad shapes"):
        state.result()
    _, runs = read_mlflow(tiny_overrides(tmp_path)["mlflow.tracking_uri"], "synthetic")
    assert [run.info.status for run in runs] == ["FAILED"]
