"""Tests load the real params.yaml and shrink it: synthetic data, one epoch, temp stores."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

from tasks.config import PipelineConfig, load_config
from tasks.workspace import Workspace
from tests.helpers.project import PARAMS, TINY, tiny_overrides

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as the pipeline sets it on CPU


# Test files that share an expensive session fixture run in one xdist worker, so it is
# built once (pytest_xdist_make_scheduler): the team stack (with the tiny served model
# test_operate also uses), and the tiny `dvc repro`. Every other file is a scope of its own.
SHARED_FIXTURE_GROUPS = {
    "test_operate": "servers",
    "test_security": "servers",
    "test_team": "servers",
    "test_export": "servers",
    "test_predict": "servers",
    "test_serving": "servers",
    "test_pipeline_dvc": "tiny-repro",
    "test_dvc_remote": "tiny-repro",
}


def pytest_configure(config):
    """Each test process gets a Prefect home of its own: flows run by tests start Prefect's
    temporary server on its SQLite database, which two processes must not share (nor the
    developer's ~/.prefect)."""
    import tempfile

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    config.prefect_home = tempfile.mkdtemp(prefix=f"pipeline-tests-prefect-{worker}-")
    os.environ["PREFECT_HOME"] = config.prefect_home


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "prefect_home", ""), ignore_errors=True)


def pytest_xdist_make_scheduler(config, log):
    """xdist's load-by-scope scheduling with a file (or its shared group) as the scope: each
    goes whole to one worker, so its module and shared session fixtures are built once."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_FIXTURE_GROUPS.get(Path(path).stem, path)

    return FileGroups(config, log)


@pytest.fixture(scope="session", autouse=True)
def _stop_prefects_temporary_server():
    """Flows run in this process start Prefect's temporary server, which Prefect stops at
    interpreter exit, after pytest has closed the output its log handler writes to (a
    "--- Logging error ---" traceback after the summary). Send the last flow-run logs and
    stop it while both the server and the output are there."""
    yield
    if "prefect.server.api.server" in sys.modules:
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=5)  # the flow runs' last logs, while the server is up
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    """A developer's MLFLOW_TRACKING_URI must never receive test runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def tiny_cfg(tmp_path) -> PipelineConfig:
    return load_config(PARAMS, tiny_overrides(tmp_path))


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """moto's S3 emulator on a free loopback port, with a generated credential and a bucket."""
    from tests.helpers.team_servers import S3Server

    server = S3Server.start("team", tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack(s3_store):
    """The README's "Team setup": `make serve-pg` (python -m flows.serve --local-postgres)
    in a git copy of the repository: its own supervised PostgreSQL, MLflow's artifacts in
    the S3 bucket, its worker taking one flow run at a time, plus a second worker started as
    on another machine (its own temp folder). For the session.

    The MLflow client in this process talks to its server with the credential the
    banner's export lines give, as a user's shell would.
    """
    from benchmarks.common import copy_repo
    from tests.helpers.operate import CLIENT_KEYS, free_port, start_stack, start_worker, stop_stack

    # The postgres account runs the cluster under the copy when tests run as root.
    top = Path(tempfile.mkdtemp(prefix="team-stack-"))
    top.chmod(0o755)
    root = copy_repo(top / "repo")
    args = ("--artifacts-destination", f"s3://{s3_store.bucket}/mlflow", "--worker-limit", "1")
    args += ("--local-postgres", "--postgres-port", str(free_port()))
    try:
        stack = start_stack(root, top / "prefect-home", args, s3_store.env)
    except BaseException:
        shutil.rmtree(top, ignore_errors=True)
        raise
    stack.second_worker_log = top / "second-machine" / "worker.log"
    stack.second_worker_log.parent.mkdir()
    second = start_worker(stack, "second-machine", top / "second-machine", stack.second_worker_log)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key in CLIENT_KEYS:  # what the banner's exports set, but the URLs
                if key.startswith("MLFLOW_") and key != "MLFLOW_TRACKING_URI":
                    patch.setenv(key, stack.env[key])
            yield stack
    finally:
        second.send_signal(signal.SIGINT)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
        strays = stop_stack(stack)
        logs = stack.logs()
        shutil.rmtree(top, ignore_errors=True)
    assert stack.process.returncode == 0, logs
    assert "stopped" in "".join(stack.output)
    assert not strays, f"processes outlived the launcher: {strays}"


@pytest.fixture(scope="session")
def team_postgres(stack):
    """The stack's own PostgreSQL (--local-postgres), to query and to kill."""
    from tests.helpers.team_servers import StackPostgres

    return StackPostgres.of(stack.root)


@pytest.fixture(scope="session")
def served_pipeline(tmp_path_factory):
    """One tiny pipeline through all six stages with every export format, for the serving
    tests (export parity, `mlflow models serve`, prediction): 28x28 grayscale synthetic
    data, a real SQLite MLflow store. Yields (config, workspace, registration record);
    cfg.mlflow.tracking_uri is the store."""
    from flows.stage import STAGE_NAMES, stage_functions
    from tasks.workspace import read_json

    root = tmp_path_factory.mktemp("served")
    overrides = tiny_overrides(root) | {
        "data.synthetic.image_size": 28,
        "data.synthetic.channels": 1,
        "train.epochs": 2,
        "export.formats": ["saved_model", "litert", "onnx"],
        "export.quantize": "int8",
        "export.parity_samples": 300,
    }
    cfg = load_config(PARAMS, overrides)
    ws = Workspace(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        for name in STAGE_NAMES:
            stage_functions()[name](cfg, ws)
    yield cfg, ws, read_json(ws.registration)


class TinyRepro(NamedTuple):
    root: Path  # the repository `dvc repro` ran in
    output: str  # what it printed
    origin: Path  # a copy of root taken right after the repro, in a folder of its own


@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory) -> TinyRepro:
    """One `dvc repro` of the tiny params in a git copy of the repository, for the session.

    root is tests/test_pipeline_dvc.py's to change; origin, copied before anything else
    touches it (git history, DVC cache and outputs included), is tests/test_dvc_remote.py's
    `team/origin`. A copy of one repro, not a second repro: the DVC tests need a repository
    that has run every stage, not a second training.
    """
    from benchmarks.common import copy_repo, set_params
    from tests.helpers.project import dvc_repro

    root = copy_repo(tmp_path_factory.mktemp("repo"))
    set_params(root, TINY)
    output = dvc_repro(root)
    origin = tmp_path_factory.mktemp("team") / "origin"
    shutil.copytree(root, origin, symlinks=True)
    return TinyRepro(root, output, origin)
