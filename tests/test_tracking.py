"""One MLflow run per pipeline execution, across stage processes, in a real sqlite store."""

from __future__ import annotations

import os

import mlflow
import pytest

from tasks.config import load_config
from tasks.tracking import runs, store
from tasks.workspace import Workspace
from tests.helpers.project import PARAMS, module_command, tiny_overrides


def run_status(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).info.status


def test_stages_share_one_run_until_the_last_closes_it(tiny_cfg, workspace):
    with runs.stage_run(tiny_cfg, workspace, "data") as first:
        mlflow.log_metric("a", 1.0)
        assert run_status(first) == "RUNNING"
    # Between stages the run is closed: a pipeline that stops here leaves nothing open.
    assert run_status(first) == "FINISHED" and workspace.run_handle.is_file()
    with runs.stage_run(tiny_cfg, workspace, "train") as second:
        mlflow.log_metric("b", 2.0)
    with runs.stage_run(tiny_cfg, workspace, "register", last=True) as third:
        pass
    assert first == second == third
    run = mlflow.MlflowClient().get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"a": 1.0, "b": 2.0}
    assert run.data.params["train.epochs"] == "1"
    # A seed_cnn run on synthetic data: no other family's or data source's settings.
    params = set(run.data.params)
    assert {"model.name", "data.synthetic.image_size"} <= params
    foreign = ("model.base", "model.weights", "model.widths", "model.units", "train.frozen_")
    foreign += ("evaluate.prompts", "evaluate.temperatures", "data.text.", "data.name")
    assert not [key for key in params if key.startswith(foreign)], sorted(params)
    assert run.data.tags["pipeline.stage.train"] == "done"
    assert not workspace.run_handle.exists()

    with runs.stage_run(tiny_cfg, workspace, "train") as next_run:
        pass
    assert next_run != first, "a finished pipeline run is never reopened"


def test_changed_config_opens_a_new_run(tiny_cfg, workspace, tmp_path):
    with runs.stage_run(tiny_cfg, workspace, "data") as first:
        pass
    changed = load_config(PARAMS, tiny_overrides(tmp_path) | {"train.epochs": 2})
    with runs.stage_run(changed, workspace, "train") as second:
        pass
    assert first != second
    assert mlflow.MlflowClient().get_run(second).data.params["train.epochs"] == "2"


def test_failing_stage_marks_the_run_failed(tiny_cfg, workspace):
    with (
        pytest.raises(RuntimeError, match="boom"),
        runs.stage_run(tiny_cfg, workspace, "train") as run_id,
    ):
        raise RuntimeError("boom")
    assert run_status(run_id) == "FAILED"
    assert not workspace.run_handle.exists()
    assert mlflow.active_run() is None


def test_environment_tracking_uri_wins(tiny_cfg, workspace, tmp_path, monkeypatch):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert store.tracking_uri(tiny_cfg.mlflow, workspace.root) == other


def test_relative_sqlite_uri_resolves_against_the_workspace(workspace):
    cfg = load_config(PARAMS)
    uri = store.tracking_uri(cfg.mlflow, workspace.root)
    assert uri == f"sqlite:///{workspace.root.resolve() / 'mlruns' / 'mlflow.db'}"


def test_a_run_orphaned_by_a_dead_process_is_ended_killed(tiny_cfg, workspace, tmp_path):
    """kill -9 leaves a run RUNNING; the next pipeline start on this host ends it KILLED."""
    import psutil

    runs.configure(tiny_cfg, workspace)
    orphan = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name(tiny_cfg.mlflow.experiment).experiment_id
    )
    gone = max(psutil.pids()) + 100_000  # no such process
    stamp = f"{store.socket.gethostname()}:{gone}:1.00"
    live = mlflow.MlflowClient().create_run(orphan.info.experiment_id)
    foreign = mlflow.MlflowClient().create_run(orphan.info.experiment_id)
    client = mlflow.MlflowClient()
    client.set_tag(orphan.info.run_id, store.OWNER_TAG, stamp)
    client.set_tag(live.info.run_id, store.OWNER_TAG, store.owner())
    client.set_tag(foreign.info.run_id, store.OWNER_TAG, "another-host:1:1.00")

    new_run = runs.start_pipeline_run(tiny_cfg, Workspace(tmp_path / "elsewhere"))

    assert run_status(orphan.info.run_id) == "KILLED"
    reason = client.get_run(orphan.info.run_id).data.tags[store.END_REASON]
    assert reason.startswith("orphaned") and str(gone) in reason
    assert run_status(live.info.run_id) == "RUNNING", "its process (this one) is alive"
    assert run_status(foreign.info.run_id) == "RUNNING", "another host's runs are left alone"
    assert run_status(new_run) == "RUNNING"


def test_a_failure_between_stages_marks_the_closed_run_failed(tiny_cfg, workspace):
    with runs.stage_run(tiny_cfg, workspace, "data") as run_id:
        pass
    runs.end_pipeline_run(workspace, "FAILED", keep_handle=False, reason="bad input")
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[store.END_REASON] == "bad input"


def test_an_unreachable_tracking_server_fails_in_bounded_time(tiny_cfg, workspace, monkeypatch):
    import time

    from tests.helpers.operate import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv(store.TIMEOUT_ENV, "3")
    started = time.monotonic()
    with pytest.raises(store.TrackingUnreachable, match=url):
        runs.configure(tiny_cfg, workspace)
    assert time.monotonic() - started < 10


def test_mlflow_client_retries_are_capped_unless_the_user_set_them(
    tiny_cfg, workspace, monkeypatch
):
    """MLflow's own defaults (7 retries, 0 + 4 + 8 + ... s apart, 120 s per request) spend
    minutes on every call to a dead server; every stage connects through configure()."""
    for key in store.CLIENT_DEFAULTS:
        monkeypatch.setenv(key, "unset")  # restored after the test, whatever configure sets
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "45")  # the user's own
    runs.configure(tiny_cfg, workspace)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "45"


def test_the_experiment_opens_in_the_ui_as_machine_learning(tiny_cfg, workspace):
    """MLflow 3's UI picks its layout from the experiment's kind: ours is the classic one
    (runs table, metric charts, models), not the GenAI traces view."""
    runs.configure(tiny_cfg, workspace)
    experiment = mlflow.MlflowClient().get_experiment_by_name(tiny_cfg.mlflow.experiment)
    assert experiment.tags[runs.EXPERIMENT_KIND_TAG] == "custom_model_development"


LOG_ONE = """
import sys
from pathlib import Path

import os

import mlflow

from tasks.tracking import runs, store
from tasks.config import load_config
from tasks.workspace import Workspace

cfg = load_config(Path("params.yaml"))
runs.configure(cfg, Workspace(Path.cwd()))  # what every stage does first
experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
    mlflow.log_text(sys.argv[1], sys.argv[1])
local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=sys.argv[1])
assert Path(local).read_text() == sys.argv[1]
print(run.info.run_id, experiment.artifact_location, run.info.artifact_uri)
"""


@pytest.mark.slow
def test_an_experiment_created_locally_is_proxied_once_the_server_serves_it(tmp_path):
    """The order that used to break: a run on the local store creates the experiment
    (file:// location), then `make serve`'s MLflow server serves the store: its runs must
    upload through the server (mlflow-artifacts:), and a later run on the local store
    still reads and writes that experiment's artifacts, all in mlflow.artifact_root."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from flows.stack import security
    from tests.helpers.operate import free_port

    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    base = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(Path.cwd())}

    def log_one(name: str, env: dict[str, str]) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", LOG_ONE, name],
            cwd=tmp_path,
            env=base | env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.splitlines()[-1].split()  # the script's own line, after MLflow's

    artifacts = tmp_path / "mlruns" / "artifacts"
    first, location, _ = log_one("local-before.txt", {})
    assert location == artifacts.resolve().as_uri()
    port = free_port()
    server = subprocess.Popen(
        module_command("flows.serve", "--mlflow-only", "--mlflow-port", str(port)),
        cwd=tmp_path,
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = server.stdout.readline() + server.stdout.readline()
        assert "Serving the MLflow UI" in banner, banner + server.stdout.read()
        user, password = security.split_credential(
            (tmp_path / security.CREDENTIAL_FILE).read_text().strip()
        )
        client = {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
        }
        served, location, artifact_uri = log_one("through-server.txt", client)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    assert location == "mlflow-artifacts:/" and artifact_uri.startswith("mlflow-artifacts:/")
    assert (artifacts / served / "artifacts" / "through-server.txt").is_file()
    after, location, artifact_uri = log_one("local-after.txt", {})
    assert artifact_uri == f"mlflow-artifacts:/{after}/artifacts"
    assert (artifacts / after / "artifacts" / "local-after.txt").is_file()
    assert (artifacts / first / "artifacts" / "local-before.txt").is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
