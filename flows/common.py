"""What the entry points share (they import it from here, never from each other): how a
stage is retried, how an expected failure ends a flow run, a bounded MLflow client, and
the data version dvc.lock pins."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from flows.stage import is_expected
from tasks.errors import DataUnavailableError
from tasks.tracking import store

STAGE_RETRIES = 2  # after the first attempt, for transient causes only


RETRY_BACKOFF_S = 5  # retries wait about 5 s, then 10 s (jittered by up to half)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry network and tracking hiccups, not bugs or bad data."""
    return isinstance(state.data, BaseException) and store.is_transient(state.data)


def failed_without_traceback(error: Exception) -> Any:
    """The flow run's Failed state for a problem the user fixes (bad config or input): the
    message says it all, so Prefect logs no traceback; anything else is re-raised as a bug.
    A caller of the flow function gets prefect.exceptions.FailedRun with that message."""
    from prefect.exceptions import FailedRun
    from prefect.states import Failed

    if is_expected(error) or isinstance(error, FailedRun):  # a subflow's, already reported
        return Failed(message=str(error))
    raise error


def mlflow_client(uri: str) -> Any:
    """A client of ``uri`` that fails in bounded time when a tracking server is down."""
    import mlflow

    from tasks.tracking import store

    store.client_defaults()
    if store.is_server(uri):
        store.wait_for_server(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


DATA_OUT = "data/prepared"  # the data stage's output in dvc.yaml


def locked_data_version(project: Path) -> str:
    """The md5 dvc.lock records for data/prepared: the current data version."""
    lock = project / "dvc.lock"
    outs = []
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        outs = stages.get("data", {}).get("outs", [])
    for out in outs:
        if out.get("path") == DATA_OUT:
            return out["md5"]
    raise DataUnavailableError(
        f"{lock} pins no version of {DATA_OUT}: run `dvc repro data` (or `git pull` and "
        "`dvc pull`) and commit dvc.lock before retraining"
    )


EPHEMERAL_STARTUP_S = 120


@contextmanager
def patient_ephemeral_server() -> Iterator[None]:
    """Without PREFECT_API_URL, a flow call starts Prefect's temporary server, which gives up
    after 20 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); on a busy two-core
    machine its start has taken longer (`Timed out while attempting to connect to ephemeral
    Prefect API server`, seen in the suite under load). Wait up to EPHEMERAL_STARTUP_S;
    the user's own setting wins."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as setting
    from prefect.settings import temporary_settings

    if setting.name in os.environ:
        yield
        return
    with temporary_settings(updates={setting: max(setting.value(), EPHEMERAL_STARTUP_S)}):
        yield


@contextmanager
def ephemeral_server_starting() -> Iterator[None]:
    """Start Prefect's temporary server before the block (TensorFlow's import) and let it
    come up while the block runs, when no PREFECT_API_URL names a server: its start (a
    process importing Prefect's server and opening its database, ~3 s) then overlaps the
    import on the second core instead of following it. The server process is launched
    before the block, so it keeps this process's stderr (the block may route it); the
    block's end, or its failure, waits for the server to answer. A start that fails is
    left to the flow call, which starts the server itself and reports the error."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as setting

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    timeout = setting.value() if setting.name in os.environ else EPHEMERAL_STARTUP_S
    server = SubprocessASGIServer()  # the one a flow call in this process finds

    def start() -> None:
        with suppress(Exception):
            server.start(timeout=max(timeout, 1))

    starting = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    starting.start()
    while server.server_process is None and starting.is_alive():  # launched: it has our stderr
        time.sleep(0.01)
    try:
        yield
    finally:
        starting.join()  # answering (or failed): a flow call reuses it
