"""Pure pieces of the flows: per-run directories, shared paths, stage selection, sweep points,
the locked data version, and the launcher's port check."""

from __future__ import annotations

import socket

import pytest

from flows.common import locked_data_version
from flows.pipeline import resolve_config, select_stages
from flows.rundir import run_root, shared_path_overrides
from flows.sweep import expand_points, validate_points
from tasks.config import ConfigError, load_config
from tasks.errors import DataUnavailableError
from tasks.workspace import Workspace
from tests.helpers.project import PARAMS, TINY


def test_run_root_fills_in_the_flow_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_root("runs/{flow_run_id}", "abc") == tmp_path / "runs" / "abc"
    assert run_root(".", "abc") == tmp_path
    with pytest.raises(ValueError, match="flow run id"):
        run_root("runs/{flow_run_id}", None)


def test_run_directories_share_the_projects_caches_and_store(tmp_path):
    cfg = load_config(PARAMS)
    project = PARAMS.parent
    assert shared_path_overrides(cfg, project, project) == {}
    assert shared_path_overrides(cfg, project, tmp_path) == {}, "outside: self-contained"
    anchored = shared_path_overrides(cfg, project, project / "runs" / "x")
    assert anchored["data.tfds_dir"] == str(project / "data" / "tfds")
    assert anchored["mlflow.artifact_root"] == str(project / "mlruns" / "artifacts")
    assert anchored["mlflow.tracking_uri"] == f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    assert "data.idx_dir" not in anchored  # already absolute in params.yaml


def test_resolve_config_anchors_only_for_a_run_directory_in_the_project(tmp_path):
    for root in (PARAMS.parent, tmp_path):
        assert resolve_config(Workspace(root), str(PARAMS), None, TINY).data.tfds_dir == "data/tfds"
    isolated = resolve_config(Workspace(PARAMS.parent / "runs" / "x"), str(PARAMS), None, TINY)
    assert isolated.data.tfds_dir == str(PARAMS.parent / "data" / "tfds")
    assert isolated.train.epochs == TINY["train.epochs"]


def test_select_stages_keeps_pipeline_order_and_rejects_typos():
    assert select_stages(None) == ("data", "preprocess", "train", "evaluate", "register", "export")
    assert select_stages(["evaluate", "train"]) == ("train", "evaluate")
    with pytest.raises(ConfigError, match="trian"):
        select_stages(["trian"])


def test_a_grid_expands_to_every_combination():
    points = expand_points({"train.learning_rate": [0.1, 0.2], "train.batch_size": [32]}, None)
    assert points == [
        {"train.learning_rate": 0.1, "train.batch_size": 32},
        {"train.learning_rate": 0.2, "train.batch_size": 32},
    ]
    assert expand_points(None, [{"train.epochs": 2}]) == [{"train.epochs": 2}]
    for grid, points in [(None, None), ({"a": [1]}, [{"a": 1}]), ({"a": []}, None), (None, [])]:
        with pytest.raises(ConfigError):
            expand_points(grid, points)


def test_every_sweep_point_is_validated_with_its_key_named():
    good = {"train.learning_rate": 0.01}
    assert validate_points([good], TINY, str(PARAMS), None).train.epochs == 1
    with pytest.raises(ConfigError, match=r"sweep point 1 .*train\.epoch"):
        validate_points([good, {"train.epoch": 2}], TINY, str(PARAMS), None)
    with pytest.raises(ConfigError, match=r"sweep point 0 .*register\.model_name"):
        validate_points([{"register.model_name": "other"}], TINY, str(PARAMS), None)


def test_the_locked_data_version_comes_from_dvc_lock(tmp_path):
    with pytest.raises(DataUnavailableError, match="dvc repro data"):
        locked_data_version(tmp_path)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  data:\n    cmd: python -m flows.stage data\n"
        "    outs:\n    - path: data/prepared\n      md5: 0123abcd.dir\n"
    )
    assert locked_data_version(tmp_path) == "0123abcd.dir"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_refuses_a_port_in_use(capsys):
    from flows.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--prefect-port", str(port), "--mlflow-port", str(free_port())]) == 2
    error = capsys.readouterr().err
    assert f"port {port}" in error and "Prefect server" in error and "--prefect-port" in error


def test_stage_log_artifacts_carry_no_terminal_codes():
    from flows.reporting import StageReport

    report = StageReport("register")
    report.buffer.write("\x1b[33mAdd type hints\x1b[0m\nGet: 10%\rGet: 100%\ndone\n")
    assert report.tail() == "Add type hints\nGet: 100%\ndone"


def test_a_cpu_only_process_gets_one_calm_line_and_no_telemetry(monkeypatch):
    """In a fresh interpreter: the entry points' setup, then TensorFlow's import, prints
    the one line and none of TensorFlow's loading banners; a user's setting wins."""
    import os
    import subprocess
    import sys

    from tasks import startup

    if startup.has_nvidia_gpu():
        pytest.skip("this machine has a GPU: the CPU-only message does not apply")
    code = (
        "import os; from tasks import startup; print(startup.prepare_process());"
        "startup.import_tensorflow(); import tensorflow as tf; tf.constant(1.0) + 1;"
        "env = os.environ; print(env['MLFLOW_DISABLE_TELEMETRY'],"
        "env['PREFECT_SERVER_ANALYTICS_ENABLED'], env['TF_CPP_MIN_LOG_LEVEL']);"
        "from tensorflow.python.util import _pywrap_util_port as port;"
        "print('oneDNN', port.IsMklEnabled())"
    )
    env = {k: v for k, v in os.environ.items() if k not in startup.NO_TELEMETRY}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop(startup.ONEDNN_ENV, None)  # TensorFlow alone turns it on only on some CPUs
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "no GPU found: TensorFlow and DALI run on the CPU",
        "true false 3",
        "oneDNN True",
    ]
    assert "I0000" not in done.stderr and "E0000" not in done.stderr, done.stderr
    assert "absl::InitializeLog" not in done.stderr
    mine = subprocess.run(
        [sys.executable, "-c", code],
        env=env | {"MLFLOW_DISABLE_TELEMETRY": "false", startup.ONEDNN_ENV: "0"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert mine.stdout.splitlines()[-2:] == ["false false 3", "oneDNN False"], mine.stdout


def test_the_last_log_line_of_a_flow_run_says_what_came_out():
    from flows.reporting import outcome_line

    record = {
        "test_accuracy": 0.91234,
        "model_name": "fashion_mnist-seed_cnn",
        "version": "4",
        "aliases": ["challenger", "champion"],
        "run_id": "ab" * 16,
        "mlflow": {"ui_url": "http://127.0.0.1:5000/#/experiments/1/runs/x", "tracking_uri": "h"},
    }
    assert outcome_line(record) == (
        "test accuracy 0.9123; registered fashion_mnist-seed_cnn version 4 (challenger, "
        "champion); MLflow: http://127.0.0.1:5000/#/experiments/1/runs/x"
    )
    local = record | {"mlflow": {"ui_url": None, "tracking_uri": "sqlite:///m.db"}}
    assert outcome_line(local).endswith(f"MLflow: run {'ab' * 16} in sqlite:///m.db")


def test_data_and_preprocess_stages_never_load_tensorflow_or_prefect(tmp_path):
    """`dvc repro`'s data (synthetic) and preprocess processes: what they import decides
    their start-up time and memory; TensorFlow, Keras and Prefect are not among it."""
    import json
    import subprocess
    import sys

    from benchmarks.common import set_params
    from tests.helpers.project import PARAMS, REPO, pipeline_env, tiny_overrides

    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    set_params(tmp_path, tiny_overrides(tmp_path))
    probe = (
        "import atexit, json, runpy, sys\n"
        "heavy = ('tensorflow', 'keras', 'prefect')\n"
        "atexit.register(lambda: print(json.dumps([m for m in heavy if m in sys.modules])))\n"
        "sys.argv = ['flows.stage', sys.argv[1]]\n"
        "runpy.run_module('flows.stage', run_name='__main__')\n"
    )
    for stage in ("data", "preprocess"):
        done = subprocess.run(
            [sys.executable, "-c", probe, stage],
            cwd=tmp_path, env=pipeline_env() | {"PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [], stage


def test_every_error_a_user_fixes_is_reported_without_a_traceback():
    """One base class (tasks.errors.UserFixableError) instead of a hand-kept list: a new
    error type in tasks/errors.py is an expected failure of every entry point."""
    import inspect

    from flows.stage import is_expected
    from tasks import errors
    from tasks.config import ConfigError
    from tasks.tracking.store import TrackingUnreachable

    defined = [
        kind
        for _, kind in inspect.getmembers(errors, inspect.isclass)
        if issubclass(kind, Exception) and kind.__module__ == errors.__name__
    ]
    assert len(defined) >= 10
    for kind in [*defined, ConfigError, TrackingUnreachable]:
        assert is_expected(kind("a message naming the fix")), kind
    assert not is_expected(KeyError("a bug"))
    assert not is_expected(TypeError("a bug"))


def test_a_flow_called_without_a_server_waits_longer_for_prefects_temporary_one(monkeypatch):
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as setting

    from flows.common import EPHEMERAL_STARTUP_S, patient_ephemeral_server

    monkeypatch.delenv(setting.name, raising=False)
    with patient_ephemeral_server():
        assert setting.value() == EPHEMERAL_STARTUP_S > 20
    assert setting.value() == 20  # Prefect's default, outside
    monkeypatch.setenv(setting.name, "7")  # the user's own setting (Prefect read it at start)
    with patient_ephemeral_server():
        assert setting.value() == 20  # left as Prefect has it
