"""The suite's hooks: a Prefect home per run, xdist groups for shared session fixtures, no
developer tracking URI. The fixtures themselves are in tests/fixtures/ (by concern)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as the pipeline sets it on CPU
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the pipeline does (tasks/startup.py)


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
    "test_ui_prefect": "servers",
    "test_pipeline_dvc": "tiny-repro",
    "test_dvc_remote": "tiny-repro",
}


def pytest_configure(config):
    """Each test process gets a Prefect home of its own: flows run by tests start Prefect's
    temporary server on its SQLite database, which two processes must not share (nor the
    developer's ~/.prefect)."""

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
