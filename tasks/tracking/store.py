"""Reaching the tracking store without hanging, racing or leaving runs open.

- Bounded waits: a tracking server (or PostgreSQL tracking database) that does not answer
  at a stage's start fails the stage within PIPELINE_TRACKING_TIMEOUT_S seconds (30 by
  default) with its URL, instead of MLflow's client retrying for minutes; MLflow's own
  per-request retries are capped too (unless the user set MLFLOW_HTTP_REQUEST_MAX_RETRIES
  / _TIMEOUT themselves).
- First use of a new SQLite store: MLflow creates its schema on first access, and two
  processes doing that at once fail (`No such constraint`); a file lock beside the
  database makes one wait for the other.
- Orphaned runs: every stage process stamps the run it works on with its owner (host,
  pid, process start time). A run left RUNNING by a process that no longer exists on this
  host (kill -9, a crashed Prefect flow run) is ended KILLED by the next pipeline start
  against the same store, with the reason as a tag. Between stages a pipeline's run is
  FINISHED, never RUNNING, so only a stage actually in progress counts as live.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import DataUnavailableError, UserFixableError
from tasks.tracking.artifacts import LOCAL_ARTIFACTS_ENV

if TYPE_CHECKING:
    from tasks.config import MlflowConfig

TIMEOUT_ENV = "PIPELINE_TRACKING_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0
CLIENT_DEFAULTS = {
    # MLflow's client defaults (7 retries, 120 s timeout) spend minutes on a dead server.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",  # seconds per request
    # A tracking server keeping artifacts in a bucket tells clients to download straight
    # from the bucket by presigned URL; the pipeline's clients go through the server, so
    # they need no route to the store (README "Team setup").
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
}
OWNER_TAG = "pipeline.owner"  # host:pid:start time of the process working on the run
END_REASON = "pipeline.end_reason"
SQLITE = "sqlite:///"
LOCK_TIMEOUT_S = 120


class TrackingUnreachable(UserFixableError, ConnectionError):
    """The tracking server did not answer in time; the message names its URL."""


class TrackingUntrusted(UserFixableError, ValueError):
    """The tracking server's TLS certificate is not one this machine trusts (a stack served
    with its own CA, whose ca.pem this host lacks); the message names the fix. Not
    transient: retrying cannot help."""


CERT_PATH_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH"  # MLflow's client: the CA bundle to trust


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def client_defaults() -> None:
    """Cap MLflow's per-request retries and send artifacts through the tracking server, for
    this process, unless the user chose otherwise."""
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def wait_for_server(uri: str, limit_s: float | None = None) -> None:
    """Return once ``uri``/health answers; raise TrackingUnreachable after ``limit_s``."""
    import ssl

    limit_s = timeout_s() if limit_s is None else limit_s
    context = ssl.create_default_context(cafile=os.environ.get(CERT_PATH_ENV) or None)
    direct = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    deadline = time.monotonic() + limit_s
    while True:
        try:
            with direct.open(f"{uri.rstrip('/')}/health", timeout=min(5.0, limit_s)):
                return
        except urllib.error.HTTPError:
            return  # it answers (a proxy or auth in front of /health): the client takes over
        except OSError as error:
            cause = getattr(error, "reason", error)
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise TrackingUntrusted(untrusted_message(uri, cause)) from None
        if time.monotonic() >= deadline:
            raise TrackingUnreachable(
                f"the tracking server {uri} did not answer for {limit_s:.0f} s ({cause}): "
                "start it (make serve) or point MLFLOW_TRACKING_URI / mlflow.tracking_uri at "
                f"a running one ({TIMEOUT_ENV} sets how long to wait)"
            )
        time.sleep(1.0)


def untrusted_message(uri: str, cause: Exception) -> str:
    why = getattr(cause, "verify_message", None) or str(cause)
    return (
        f"the tracking server {uri} presents a TLS certificate this machine does not trust "
        f"({why}): copy the stack's CA from the server host (.pipeline/secrets/tls/ca.pem in "
        f"the project `make serve` runs in) and point {CERT_PATH_ENV}, SSL_CERT_FILE, "
        "REQUESTS_CA_BUNDLE and PREFECT_API_SSL_CERT_FILE at it, as the serve banner's "
        "export line does"
    )


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def is_database(uri: str) -> bool:
    """A PostgreSQL tracking store: postgres://, postgresql:// or postgresql+<driver>://."""
    scheme = uri.partition("://")[0]
    return scheme == "postgres" or scheme.partition("+")[0] == "postgresql"


def psycopg_conninfo(uri: str) -> str:
    """``uri`` as psycopg takes it: no SQLAlchemy +driver suffix."""
    return "postgresql://" + uri.partition("://")[2]


def wait_for_database(uri: str, limit_s: float | None = None) -> None:
    """Return once the PostgreSQL tracking database takes a login; raise TrackingUnreachable
    naming it (password hidden) after ``limit_s``. MLflow itself would retry for most of an
    hour before giving up."""
    import psycopg

    limit_s = timeout_s() if limit_s is None else limit_s
    deadline = time.monotonic() + limit_s
    conninfo = psycopg_conninfo(uri)
    while True:
        try:
            psycopg.connect(conninfo, connect_timeout=max(2, int(min(5.0, limit_s)))).close()
            return
        except psycopg.OperationalError as error:
            cause = str(error).strip().splitlines()[-1]
        if time.monotonic() >= deadline:
            raise TrackingUnreachable(
                f"the tracking database {redacted(uri)} did not answer for {limit_s:.0f} s "
                f"({cause}): start it or point MLFLOW_TRACKING_URI / mlflow.tracking_uri at a "
                f"running one ({TIMEOUT_ENV} sets how long to wait)"
            )
        time.sleep(1.0)


@contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Hold a lock beside a SQLite store's database while its schema may be created."""
    if not uri.startswith(SQLITE):
        yield
        return
    from filelock import FileLock

    database = Path(uri[len(SQLITE) :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.init.lock", timeout=LOCK_TIMEOUT_S):
        yield


def owner() -> str:
    """This process, as a run's owner: host, pid and start time (pids are reused)."""
    import psutil

    started = psutil.Process().create_time()
    return f"{socket.gethostname()}:{os.getpid()}:{started:.2f}"


def _owner_alive(stamp: str) -> bool | None:
    """Whether the owner process still runs; None when it is on another host (unknown)."""
    import psutil

    host, _, rest = stamp.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.Error, ValueError):
        return False


def end_orphaned_runs(client: Any, experiment_id: str, keep: str | None = None) -> list[str]:
    """End KILLED the RUNNING runs of ``experiment_id`` whose owner process is gone."""
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    ended = []
    for run in running:
        stamp = run.data.tags.get(OWNER_TAG)
        if run.info.run_id == keep or not stamp or _owner_alive(stamp) is not False:
            continue
        reason = f"orphaned: its process ({stamp}) ended without closing it"
        client.set_tag(run.info.run_id, END_REASON, reason)
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


TRACKING_ENV = "MLFLOW_TRACKING_URI"


def tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path in params.yaml is taken from ``root``.

    On a store without its server, this process then reads and writes the artifacts of
    experiments its server proxies (``mlflow-artifacts:``) in ``mlflow.artifact_root``,
    where that server keeps them (tasks/tracking/artifacts.py)."""
    uri = os.environ.get(TRACKING_ENV) or cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        db_path = (root / uri[len(prefix) :]).resolve()
        db_path.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db_path)
    if not is_server(uri) and "://" not in cfg.artifact_root:
        os.environ[LOCAL_ARTIFACTS_ENV] = str((root / cfg.artifact_root).resolve())
    return uri


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# MLflow REST error codes that mean "try again" rather than "this request is wrong".
TRANSIENT_MLFLOW_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)


def is_transient(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is worth retrying: network or store hiccups.

    Connection failures, timeouts, a failed DNS lookup, an MLflow server answering "try
    again", SQLite's "database is locked", PostgreSQL's connection errors (OperationalError)
    and a dataset download that found no network.
    Wrong configs, missing files and bugs are not transient and fail at once.
    """
    import mlflow

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        name = type(error).__name__
        if isinstance(error, ConnectionError | TimeoutError | DataUnavailableError):
            return True
        if isinstance(error, OSError) and name == "gaierror":
            return True
        if isinstance(error, mlflow.exceptions.MlflowException) and (
            error.error_code in TRANSIENT_MLFLOW_CODES
        ):
            return True
        if "database is locked" in str(error):  # SQLite store busy with another writer
            return True
        if _database_unavailable(error):
            return True
        # requests/urllib3/httpx connection errors do not subclass the builtin ones.
        if type(error).__module__.split(".")[0] in ("requests", "urllib3", "httpx") and any(
            word in name for word in ("Connect", "Timeout", "MaxRetry", "Protocol")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


# PostgreSQL error classes that mean "the server is away": 08 connection exceptions, 57P0x
# shutdowns and "cannot connect now" (a restart); a psycopg error without a SQLSTATE is one
# raised client-side on a lost or refused connection.
TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def _database_unavailable(error: BaseException) -> bool:
    """A PostgreSQL store restarting or unreachable, not a wrong password or a bad query.
    SQLAlchemy's wrapper says so itself (connection_invalidated) or carries psycopg's error
    as its cause, which the caller's walk reaches."""
    import psycopg

    if getattr(error, "connection_invalidated", False):
        return True
    if not isinstance(error, psycopg.OperationalError):
        return False
    state = getattr(error, "sqlstate", None)
    return state is None or state.startswith(TRANSIENT_SQLSTATES)
