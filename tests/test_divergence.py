"""A diverged model is never registered, promoted or exported, and says so in one line."""

from __future__ import annotations

import json
import math

import mlflow
import pytest

from tasks.workspace import Workspace, write_json
from tests.helpers.project import make_project, run_entry_point, run_statuses


def test_json_files_never_hold_bare_nan(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"test": {"loss": math.nan, "accuracy": 0.1}, "curve": [1.0, math.inf]})
    text = target.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"test": {"loss": None, "accuracy": 0.1}, "curve": [1.0, None]}


def test_a_nan_parity_difference_fails_the_export():
    from tasks.stages.export import parity_failures

    row = {"max_abs_diff": math.nan, "top1_agreement": 1.0, "quantized": False}
    report = {"samples": 8, "formats": {"onnx": row}}
    assert parity_failures(report) and "onnx" in parity_failures(report)[0]
    within = {"max_abs_diff": 1e-7, "top1_agreement": 1.0, "quantized": False}
    assert parity_failures({"samples": 8, "formats": {"onnx": within}}) == []


def test_non_finite_test_metrics_are_refused():
    from tasks.errors import DivergedError, refuse_non_finite

    refuse_non_finite({"accuracy": 0.5, "loss": 1.2}, "evaluate")
    with pytest.raises(DivergedError, match=r"loss=nan.*lower train.learning_rate"):
        refuse_non_finite({"accuracy": 0.1, "loss": math.nan}, "evaluate")


@pytest.mark.slow
def test_a_diverging_run_stops_at_once_and_registers_nothing(tmp_path):
    """The issue's reproduction: learning rate 1e6. Training stops in the epoch the loss
    stops being a number; the flow fails with one line naming it; the MLflow run ends
    FAILED; no model file, no metrics, no registered model, no export."""
    root = make_project(tmp_path / "project", **{"train.learning_rate": 1000000, "train.epochs": 3})
    done = run_entry_point(root, "flows.pipeline", "--workdir", ".")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    said = [line for line in output.splitlines() if "training diverged" in line]
    assert len(said) == 1 and said[0].startswith("error:"), output[-3000:]
    assert "at epoch 1," in said[0] and "train.learning_rate=1e+06" in said[0], said[0]
    assert "Traceback" not in output
    assert "Epoch 2/3" not in output, "training went on after the loss diverged"
    assert run_statuses(root) == ["FAILED"]
    ws = Workspace(root)
    assert not ws.model_file.exists() and not ws.metrics.exists()
    assert not ws.registration.exists() and not (root / "exports").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    assert client.search_registered_models() == []
    assert not list((root / ".pipeline" / "checkpoints").glob("*")), "no diverged checkpoint"
