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


# Scopes that take a minute or more (seconds in the CI log of the 2-core AMD EPYC machine,
# `-v` timestamps): they start first, longest first, so that no process ends idle while the
# other still runs a long one. xdist's own order is by number of tests, which started the
# single 3-minute Fashion-MNIST test last, alone (the suite's last 200 s). A missing or stale
# entry only costs wall time.
SCOPE_SECONDS = {
    "README.md": 730,
    "servers": 700,
    "tests/test_faults.py": 305,
    "tests/test_network_hosts.py": 280,
    "tests/test_reproduce.py": 240,
    "tests/test_distribute.py": 210,
    "tests/test_fashion_mnist.py": 195,
    "tests/test_stagehost.py": 150,
    "tests/test_transfer_pipeline.py": 140,
    "tiny-repro": 130,
    "tests/test_ui_mlflow.py": 80,
    "tests/test_registry_rules.py": 80,
    "tests/test_transfer.py": 70,
    "tests/test_input_errors.py": 70,
}


def scope_of(nodeid: str) -> str:
    """A test's xdist scope: its file, or the shared fixture group its file belongs to."""
    path = nodeid.split("::", 1)[0]
    return SHARED_FIXTURE_GROUPS.get(Path(path).stem, path)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Long scopes first (a stable sort: the README's examples keep their order)."""
    items.sort(key=lambda item: -SCOPE_SECONDS.get(scope_of(item.nodeid), 0))


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
    goes whole to one worker, so its module and shared session fixtures are built once.
    Scopes go out in collection order (SCOPE_SECONDS), not reordered by number of tests."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    config.option.loadscopereorder = False
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
