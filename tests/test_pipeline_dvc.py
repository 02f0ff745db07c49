"""End to end: the real `dvc repro` in a temporary git copy of the repository."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from benchmarks.common import set_params
from flows.stage import STAGE_NAMES
from tasks import startup
from tasks.config import load_config
from tasks.workspace import Workspace
from tests.helpers.pipeline_checks import check_pipeline_run
from tests.helpers.project import (
    dvc_repro,
    experiment_of,
    module_command,
    pipeline_env,
    read_mlflow,
    stages_run,
)
from tests.helpers.readme import check_quiet, check_result

pytestmark = pytest.mark.slow
STAGES = STAGE_NAMES


@pytest.fixture(scope="module")
def repro(tiny_repro):
    """The session's repository after one `dvc repro` of the tiny params
    (tests/fixtures/pipeline.py); shared by the tests below, which change it."""
    return tiny_repro.root, tiny_repro.output


def test_first_repro_runs_every_stage_and_records_everything(repro):
    root, output = repro
    assert stages_run(output) == list(STAGES)
    check_result(output)  # it ends with the result line, after DVC's two
    check_quiet(output)  # and says nothing that reads as a failure
    tracking_uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"  # the default store
    client, runs = read_mlflow(tracking_uri, experiment_of(root))
    assert len(runs) == 1, "one MLflow run per pipeline execution"
    ws = Workspace(root)
    model_name = load_config(root / "params.yaml").register.model_name  # auto: resolved
    registration = check_pipeline_run(client, runs[0], epochs=1, model_name=model_name, ws=ws)
    assert registration["version"] == "1"
    assert registration["promoted"] is True
    headline = json.loads(ws.metrics.read_text())
    assert "previous_champion" not in headline, "no champion to compare with"
    assert str(client.get_model_version_by_alias(model_name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(model_name, "challenger").version) == "1"

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (data_out,) = lock["stages"]["data"]["outs"]
    version = client.get_model_version(model_name, "1")
    assert version.tags["data_version"] == data_out["md5"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert version.tags["git_commit"].startswith(head)


def test_unchanged_workspace_runs_nothing(repro):
    root, _ = repro
    output = dvc_repro(root)
    assert stages_run(output) == []
    assert "didn't change, skipping" in output


def test_editing_epochs_reruns_train_evaluate_register_export_only(repro):
    root, _ = repro
    set_params(root, {"train.epochs": 2})
    output = dvc_repro(root)
    assert stages_run(output) == ["train", "evaluate", "register", "export"]
    client, runs = read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", experiment_of(root))
    assert len(runs) == 2
    registration = check_pipeline_run(
        client,
        runs[0],
        epochs=2,
        model_name=load_config(root / "params.yaml").register.model_name,
        ws=Workspace(root),
    )
    assert registration["version"] == "2"
    assert "challenger" in registration["aliases"]
    # the headline's margin is against the champion of when evaluate ran: version 1
    first = client.get_model_version(registration["model_name"], "1")
    headline = json.loads(Workspace(root).metrics.read_text())
    margin = headline["test"]["accuracy"] - float(first.tags["test_accuracy"])
    expected = {"version": 1, "accuracy_margin": pytest.approx(margin, abs=1e-6)}
    assert headline["previous_champion"] == expected


def test_a_data_only_repro_leaves_no_run_open(repro):
    """A repro that runs the data stage alone (`dvc repro -f -s data`) stops the pipeline
    after one stage: its MLflow run must not stay RUNNING."""
    root, _ = repro
    env = pipeline_env()
    result = subprocess.run(
        ["dvc", "repro", "--force", "--single-item", "data"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert stages_run(result.stdout) == ["data"]
    experiment = experiment_of(root)
    _, runs = read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", experiment)
    assert [run.info.status for run in runs if run.info.status == "RUNNING"] == []
    assert runs[0].data.tags["pipeline.stage.data"] == "done"


def test_editing_export_params_reruns_export_only_into_the_registering_run(repro):
    """A new export of the same version: only the export stage runs, and it logs into the
    MLflow run that registered the version (no new run, the version's tags updated)."""
    root, _ = repro
    set_params(root, {"export.parity_samples": 32})
    output = dvc_repro(root)
    assert stages_run(output) == ["export"]
    registration = json.loads(Workspace(root).registration.read_text())
    parity = json.loads(Workspace(root).parity.read_text())
    assert parity["samples"] == 32
    assert parity["model"] == registration["model_uri"]
    experiment = experiment_of(root)
    client, runs = read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", experiment)
    registering = client.get_run(registration["run_id"])
    assert registering.info.status == "FINISHED"
    assert registering.data.tags["pipeline.stage.export"] == "done"
    assert all(run.info.status != "RUNNING" for run in runs)
    assert stages_run(dvc_repro(root)) == []


def test_metrics_show_prints_headline_numbers_and_per_class_on_request(repro):
    root, _ = repro
    env = pipeline_env()

    def show(*targets: str) -> dict:
        done = subprocess.run(
            ["dvc", "metrics", "show", "--json", *targets],
            cwd=root, env=env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        [(_, shown)] = json.loads(done.stdout).items()
        return shown["data"]

    headline = show()
    assert list(headline) == ["reports/metrics.json"]
    assert set(headline["reports/metrics.json"]["data"]["test"]) == {"accuracy", "loss", "macro_f1"}
    per_class = show("reports/evaluate/per_class.json")["reports/evaluate/per_class.json"]["data"]
    assert len(per_class) == 10 and set(per_class["class_0"]) >= {"precision", "recall", "f1"}


def test_a_default_flow_run_leaves_dvc_outputs_and_git_untouched(repro):
    """`python -m flows.pipeline` (no --workdir) beside a `dvc repro`'d checkout writes to
    runs/<flow-run-id>/ and registers there; DVC and git see no change."""
    root, _ = repro
    # As a user's shell has it: no TF_CPP_MIN_LOG_LEVEL (the test session sets one).
    env = {k: v for k, v in pipeline_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}

    def git_status() -> str:  # the fixture's own edits (params.yaml, dvc.lock) are there
        return subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout

    before = git_status()
    done = subprocess.run(
        module_command("flows.pipeline"),
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    if not startup.has_nvidia_gpu():  # calm on CPU: one line instead of CUDA's E-lines
        assert "no GPU found: TensorFlow and DALI run on the CPU" in output
        assert "E0000" not in output and "cuInit" not in output and "I0000" not in output
    [run_dir] = (root / "runs").iterdir()
    assert (run_dir / "reports" / "registration.json").is_file()
    assert f"outputs in {run_dir}" in done.stdout + done.stderr
    status = subprocess.run(
        ["dvc", "status", "--json"], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(status.stdout) == {}
    assert git_status() == before


def test_plots_show_embeds_the_static_curves_and_leaves_git_clean(repro):
    root, _ = repro
    before = subprocess.run(
        ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    done = subprocess.run(
        ["dvc", "plots", "show"],
        cwd=root, env=pipeline_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    page = (root / "dvc_plots" / "index.html").read_text()
    assert "training_curves.png" in page and "confusion_matrix.png" in page
    after = subprocess.run(
        ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert after == before
