"""The README's "Operate" section, step for step, against real servers on loopback.

One stack for the session (README step 1, the `stack` fixture in conftest.py, shared with
tests/test_security.py): `python -m flows.serve` in a git copy of the repository starts
the Prefect server, the worker and the MLflow server on free ports, with a temporary
PREFECT_HOME, and registers prefect.yaml's deployments. Each test then uses the `prefect`
CLI as the README does (step 2), with the environment the banner's export lines give,
and checks Prefect's API, the MLflow server and the registry. Every test trains on tiny
synthetic data, in its own experiment and registered model. At the end the launcher is
stopped with Ctrl-C (SIGINT) and no process it started may survive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from benchmarks.common import set_params
from flows.rundir import RUN_ID_FIELD
from tasks.tracking.lineage import dvc_hash
from tasks.workspace import Workspace, read_json
from tests.helpers.operate import (
    BIN,
    RUN_TIMEOUT_S,
    deployment_run_args,
    flow_run_id,
)
from tests.helpers.pipeline_checks import check_pipeline_run
from tests.helpers.project import FASHION, REAL_FASHION, TINY

pytestmark = pytest.mark.slow


def tiny(name: str, **extra) -> dict:
    """Tiny synthetic overrides, in an experiment and a registered model of their own."""
    return TINY | {"mlflow.experiment": name, "register.model_name": name} | extra


def run_deployment(stack, name: str, parameters: dict) -> tuple[subprocess.CompletedProcess, str]:
    result = stack.prefect(*deployment_run_args(name, parameters))
    return result, flow_run_id(result.stdout)


def client_for(stack) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(stack.mlflow_uri)
    return mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)


def runs_of(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_deployments_are_registered_and_the_retrain_schedule_is_paused(stack):
    listed = stack.prefect("deployment", "ls").stdout
    for name in ("training-pipeline/train", "scheduled-retrain/nightly", "training-sweep/sweep"):
        assert name in listed
    local = stack.api("deployments/name/training-pipeline/train")
    assert local["parameters"]["workdir"] == f"runs/{RUN_ID_FIELD}"
    # No pull section in prefect.yaml: flow runs start in the directory deployed from.
    [step] = local["pull_steps"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(stack.root)
    retrain = "scheduled-retrain/nightly"
    [schedule] = stack.api(f"deployments/name/{retrain}")["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * *"
    assert schedule["active"] is False
    assert schedule["id"] in stack.prefect("deployment", "schedule", "ls", retrain).stdout
    for command, active in (("resume", True), ("pause", False)):  # README step 7, and back
        done = stack.prefect("deployment", "schedule", command, retrain, schedule["id"])
        assert done.returncode == 0, done.stdout + done.stderr
        [after] = stack.api(f"deployments/name/{retrain}")["schedules"]
        assert after["active"] is active


def test_two_deployment_runs_at_once_are_tracked_registered_and_kept_apart(stack):
    """Two runs of the deployment with overrides, launched together (one pair of training
    processes serves both the single-run checks and the concurrency checks)."""
    name = "operate-runs"
    launched = [
        subprocess.Popen(
            [
                str(BIN / "prefect"),
                *deployment_run_args(
                    "training-pipeline/train",
                    {"overrides": tiny(name, **{"train.seed": seed, "train.epochs": 2})},
                ),
            ],
            cwd=stack.root,
            env=stack.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [process.communicate(timeout=RUN_TIMEOUT_S)[0] for process in launched]
    for process, output in zip(launched, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        # `--watch` shows the flow's result line: accuracy, version and aliases, the run
        # (Rich wraps the CLI's lines at the terminal width: compare with spaces collapsed)
        said = " ".join(output.split())
        assert re.search(rf"test accuracy [\d.]+; registered {name} version \d", said), said
        assert "; MLflow: " in said, said[-3000:]
    ids = [flow_run_id(output) for output in outputs]
    assert len(set(ids)) == 2
    for run_id in ids:
        assert stack.flow_run(run_id)["state"]["type"] == "COMPLETED"

    client = client_for(stack)
    runs = {run.info.run_id: run for run in runs_of(client, name)}
    workspaces = [Workspace(stack.root / "runs" / i) for i in ids]  # each its own directory
    registrations = [read_json(ws.registration) for ws in workspaces]
    assert {r["run_id"] for r in registrations} == set(runs), "one MLflow run per flow run"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=stack.root, capture_output=True, text=True, check=True
    ).stdout.strip()
    for ws, registered in zip(workspaces, registrations, strict=True):
        run = runs[registered["run_id"]]
        assert run.data.tags["pipeline.workdir"] == str(ws.root)
        assert check_pipeline_run(client, run, epochs=2, model_name=name, ws=ws) == registered
        assert registered["mlflow"]["ui_url"].startswith(stack.mlflow_uri)
        # Lineage from a deployment run: the project's real commit, not "unknown".
        version = client.get_model_version(name, registered["version"])
        assert version.tags["git_commit"].startswith(head)
        assert run.data.tags["pipeline.git_commit"].startswith(head)
        assert run.data.tags["mlflow.source.name"] == "deployment train"  # the Source column

    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert {v.run_id for v in versions} == set(runs)
    assert {r["version"] for r in registrations} == {"1", "2"}
    accuracy = {str(v.version): float(v.tags["test_accuracy"]) for v in versions}
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    assert accuracy[champion] == max(accuracy.values())
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"

    # Two workers, as on two machines (tests/fixtures/servers.py): each took one of the
    # runs, and one lock on the Prefect server serialized their alias moves.
    worker_logs = [stack.root / ".pipeline" / "serve" / "worker.log", stack.second_worker_log]
    # A flow run's own output (its "View at .../flow-run/<id>" line) goes to its worker's log.
    taken = [sum(f"flow-run/{i}" in log.read_text() for i in ids) for log in worker_logs]
    assert taken == [1, 1], taken
    tags = [client.get_run(v.run_id).data.tags for v in versions]  # bookkeeping: on the runs
    held = sorted(tuple(map(float, t["registry.lock_held"].split("-"))) for t in tags)
    assert held[0][1] <= held[1][0], f"alias moves overlapped: {held}"
    for run_tags in tags:
        assert run_tags["registry.lock"] == f"prefect: registry-{name}"

    # Per-stage logs and the run summary are artifacts of each flow run.
    for run_id, registered in zip(ids, registrations, strict=True):
        artifacts = stack.api_post_artifacts(run_id)
        descriptions = {a["description"] for a in artifacts}
        assert all(a["key"] and a["description"] for a in artifacts), "every artifact titled"
        for stage in ("data", "preprocess", "train", "evaluate", "register"):
            assert f"{stage} stage log (completed)" in descriptions
        train_log = next(a for a in artifacts if a["description"].startswith("train"))["data"]
        assert "Epoch 2/2" in train_log, train_log  # Keras' per-epoch lines
        assert train_log.count("training on 1 replica(s)") == 1, train_log  # each line once
        summary = next(a for a in artifacts if a["key"] == "pipeline-summary")["data"]
        version = registered["version"]
        assert f"{name} v{version}" in summary and "Test accuracy" in summary
        assert "| Trained on | 1 replica(s) (auto), global batch 64 |" in summary
        assert f"{stack.mlflow_uri}/#/models/{name}/versions/{version}" in summary


@pytest.fixture(scope="module")
def real_source(stack) -> Path:
    """A copy of the IDX files beside the stack's project, deleted before the rebuilds."""
    if not FASHION.is_dir():
        assert not os.environ.get("CI"), "CI installs dataset-fashion-mnist: never skip there"
        pytest.skip("apt-get install dataset-fashion-mnist (.ci/run installs it)")
    source = stack.root.parent / "fashion-idx"
    shutil.copytree(FASHION, source)
    return source


@pytest.fixture(scope="module")
def sweep(stack, real_source) -> tuple[str, subprocess.CompletedProcess, str]:
    """A sweep of two points on the real files: (model name, its CLI result, flow run id)."""
    name = "operate-sweep"
    points = [{"train.learning_rate": 0.001}, {"train.learning_rate": 0.003}]
    overrides = tiny(name, **REAL_FASHION, **{"data.idx_dir": str(real_source)})
    result, sweep_id = run_deployment(
        stack, "training-sweep/sweep", {"points": points, "overrides": overrides}
    )
    return name, result, sweep_id


def test_a_sweep_nests_its_points_and_registers_only_the_best(stack, sweep):
    name, result, sweep_id = sweep
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # `--watch` says each point's end and the winner with its registered version
    said = " ".join(result.stdout.split())
    assert "point 0 of 2 (" in said and "point 1 of 2 (" in said, said[-3000:]
    assert re.search(rf"sweep winner: point \d .*registered {name} version \d", said), said

    client = client_for(stack)
    runs = runs_of(client, name)
    [parent] = [run for run in runs if run.data.tags.get("pipeline.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert {c.data.params["train.learning_rate"] for c in children} == {"0.001", "0.003"}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["pipeline.workdir"].startswith(str(stack.root / "runs" / sweep_id))
    best = max(child.data.metrics["test/accuracy"] for child in children)
    [version] = client.search_model_versions(f"name = '{name}'")
    winner = client.get_run(version.run_id)
    assert winner.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert winner.data.metrics["test/accuracy"] == best
    assert parent.data.tags["registered.version"] == str(version.version) == "1"
    assert parent.data.tags["sweep.best_run_id"] == version.run_id


def test_deployment_and_sweep_versions_are_rebuilt_after_their_source_is_gone(
    stack, sweep, real_source
):
    """A deployment run's version, rebuilt by `python -m flows.reproduce` in another clone
    (a fresh `git clone` beside the stack's project: the same DVC remote, an empty cache,
    the MLflow server), and the sweep's winner, rebuilt by the reproduce deployment on the
    stack's worker; both after the IDX files they were trained from are deleted."""
    name = "operate-origin"
    overrides = tiny(name, **REAL_FASHION, **{"data.idx_dir": str(real_source)})
    stages = ["data", "preprocess", "train", "evaluate", "register"]  # a version is enough
    parameters = {"overrides": overrides, "stages": stages}
    result, _ = run_deployment(stack, "training-pipeline/train", parameters)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = client_for(stack)
    for model in (name, sweep[0]):
        tags = client.get_model_version(model, "1").tags
        remote = stack.root.parent / "gpu-train-pipeline-dvc-storage"  # the default, beside it
        assert tags["data_storage"] == f"DVC remote 'storage' ({remote})", tags["data_storage"]
    shutil.rmtree(real_source)

    clone = stack.root.parent / "clone-b"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "clone", "-q", str(stack.root), str(clone)], check=True)
    done = subprocess.run(
        [str(BIN / "python"), "-m", "flows.reproduce", f"models:/{name}/1"],
        cwd=clone,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "rule: exact" in output and "result: MATCH" in output, output[-2000:]
    assert "from DVC remote 'storage'" in output, "clone B's cache was empty: pulled"

    # The sweep's winner, by the reproduce deployment on the stack's worker.
    result, reproduce_id = run_deployment(
        stack, "reproduce-version/reproduce", {"model_uri": f"models:/{sweep[0]}/1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert stack.flow_run(reproduce_id)["state"]["type"] == "COMPLETED"
    (summary,) = [
        a for a in stack.api_post_artifacts(reproduce_id) if a["key"] == "reproduction-summary"
    ]
    assert "result: MATCH" in summary["data"] and "rule: exact" in summary["data"]
    for model in (name, sweep[0]):
        tagged = [run for run in runs_of(client, model) if "reproduces" in run.data.tags]
        assert [run.data.tags["reproduces.match"] for run in tagged] == ["true"], model


def test_a_bad_override_fails_fast_with_the_key_and_leaves_nothing(stack):
    name = "operate-bad"
    before = len(stack.api_flow_runs())
    result, run_id = run_deployment(
        stack, "training-pipeline/train", {"overrides": tiny(name, **{"train.epoch": 3})}
    )
    assert result.returncode != 0
    # what the README shows `--watch` printing
    said = " ".join((result.stdout + result.stderr).split())
    assert "Finished in state Failed(\"unknown config key 'train.epoch'" in said, said
    assert said.endswith("Flow run finished in state 'Failed'."), said[-2000:]
    state = stack.flow_run(run_id)["state"]
    assert state["type"] == "FAILED" and "train.epoch" in state["message"]
    assert not (stack.root / "runs" / run_id).exists()

    points = [{"train.learning_rate": 0.01}, {"train.epoch": 2}]
    result, sweep_id = run_deployment(
        stack, "training-sweep/sweep", {"points": points, "overrides": tiny(name)}
    )
    state = stack.flow_run(sweep_id)["state"]
    assert result.returncode != 0 and state["type"] == "FAILED"
    assert "sweep point 1" in state["message"] and "train.epoch" in state["message"]
    assert len(stack.api_flow_runs()) == before + 2, "the sweep launched no point"
    assert client_for(stack).get_experiment_by_name(name) is None, "no MLflow run"
    assert not (stack.root / "runs" / sweep_id).exists()


def flow_run_process(stack, flow_run_id: str):
    """The process a worker (either of the stack's two) started for ``flow_run_id``
    (Prefect puts the id in its environment)."""
    import psutil

    for process in psutil.process_iter():
        try:
            if process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                return process
        except psutil.Error:
            continue
    return None


def test_a_killed_flow_run_is_crashed_in_prefect_and_killed_in_mlflow(stack):
    """kill -9 of a flow run's process: Prefect marks it Crashed; the next pipeline start
    against the same tracking store ends its orphaned MLflow run KILLED. That next start
    is the nightly retrain (one training for both checks), which trains on the data
    version dvc.lock pins."""
    import time

    set_params(stack.root, TINY)  # the data stage below must work offline
    repro = subprocess.run(
        [str(BIN / "dvc"), "repro", "data"],
        cwd=stack.root,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    lock = yaml.safe_load((stack.root / "dvc.lock").read_text())
    [out] = lock["stages"]["data"]["outs"]

    name = "operate-crash-retrain"
    slow = tiny(name, **{"data.synthetic.train_size": 3000, "train.epochs": 3})
    started = stack.prefect(
        "deployment", "run", "training-pipeline/train", "--param", f"overrides={json.dumps(slow)}"
    )
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = flow_run_id(started.stdout)
    checkpoints = stack.root / "runs" / run_id / ".pipeline" / "checkpoints"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list(checkpoints.glob("train-*/backup-*/training_metadata.json")):
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)
    process = flow_run_process(stack, run_id)
    assert process is not None
    process.kill()
    while stack.flow_run(run_id)["state"]["type"] != "CRASHED":
        assert time.monotonic() < deadline, stack.flow_run(run_id)["state"]
        time.sleep(1)
    client = client_for(stack)
    [orphan] = runs_of(client, name)
    assert orphan.info.status == "RUNNING", "nobody closed it yet"

    result, run_id = run_deployment(stack, "scheduled-retrain/nightly", {"overrides": tiny(name)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ended = client.get_run(orphan.info.run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["pipeline.end_reason"].startswith("orphaned")

    ws = Workspace(stack.root / "runs" / run_id)
    assert dvc_hash(ws.prepared) == out["md5"]
    version = client.get_model_version_by_alias(name, "champion")
    assert version.tags["data_version"] == out["md5"]
    run = client.get_run(version.run_id)
    assert "data.source" in run.data.params and run.data.tags["pipeline.stage.register"] == "done"
    assert json.loads(version.tags["params"])["register.model_name"] == name


def test_batch_predict_writes_predictions_and_logs_them_with_the_version(stack, served_pipeline):
    """The session's tiny model, registered on the stack's MLflow server by the register
    stage's own log_model (no second training), predicts a folder inside the project."""
    from tasks.config import load_config
    from tasks.images.register import served_model
    from tasks.prepared import load_split
    from tasks.stages.register import log_model
    from tests.helpers.files import png_bytes, read_csv
    from tests.helpers.project import PARAMS

    cfg, ws, _ = served_pipeline
    name = "operate-predict"
    client = client_for(stack)
    named = load_config(PARAMS, cfg.flat() | {"register.model_name": name})
    scratch = stack.root / "data" / "operate-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    version = log_model(served_model(named, ws, scratch), named)
    client.set_registered_model_alias(name, "champion", version)
    images, _ = load_split(ws.prepared, "test")
    folder = stack.root / "data" / "predict-operate"  # git-ignored, inside the project
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"{i}.png").write_bytes(png_bytes(images[i]))
    (folder / "broken.png").write_bytes(png_bytes(images[0])[:40])

    # As the README writes it: plain -p values are strings to the Prefect CLI.
    result = stack.prefect(
        *("deployment", "run", "batch-predict/predict", "-p", "images=data/predict-operate"),
        *("-p", f"model_uri=models:/{name}@champion", "--watch"),
    )
    run_id = flow_run_id(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outdir = stack.root / "runs" / run_id
    rows = read_csv(outdir / "predictions.csv")
    expected = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(
        images[:6].astype("float32")
    )
    assert [row["path"] for row in rows] == [f"data/predict-operate/{i}.png" for i in range(6)]
    assert [row["label"] for row in rows] == list(expected["label"])
    [failed] = read_csv(outdir / "errors.csv")
    assert failed["path"] == "data/predict-operate/broken.png"

    [run] = runs_of(client, "batch-predict")
    assert run.data.tags["model_name"] == name and run.data.tags["model_version"] == version
    assert run.data.metrics["predicted"] == 6 and run.data.metrics["failed"] == 1
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "predict")}
    assert logged == {"predict/predictions.csv", "predict/errors.csv"}
    [summary] = [a for a in stack.api_post_artifacts(run_id) if a["key"] == "batch-predict-summary"]
    assert f"models:/{name}/{version}" in summary["data"] and "broken.png" in summary["data"]

    # Parameters come from anyone with API access: nothing outside the project is read.
    result, run_id = run_deployment(stack, "batch-predict/predict", {"images": "/etc"})
    state = stack.flow_run(run_id)["state"]
    assert result.returncode != 0 and state["type"] == "FAILED"
    assert "only inside the project" in state["message"]
    assert not (stack.root / "runs" / run_id).exists()
