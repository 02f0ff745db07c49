"""The lock that serializes changes to one registered model, as wide as its registry.

Alias moves read the champion, compare and write; two pipelines doing that at once
against the same old champion would both promote. The lock must therefore be shared by
every client of the registry, and the widest thing all of them already reach is used:

- the tracking database is PostgreSQL (``postgresql://`` tracking URI): a PostgreSQL
  advisory lock on it (every client of that registry connects there; released by the
  server when the holder's connection drops, so a killed process never leaves it held);
- a Prefect API is configured (PREFECT_API_URL in the environment: deployment runs on
  workers, or a shell pointed at the team's server): a Prefect global concurrency limit
  of 1 slot on that server, held with a lease (a killed holder frees it after LEASE_S);
- otherwise (the SQLite default, or a tracking server without Prefect): a file lock,
  which serializes the processes of this machine only. The log says so.

Which lock is in force is printed when it is taken and kept on the registered version
(tags ``registry.lock`` and ``registry.lock_held`` of the run that registered).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import RegistryLockError
from tasks.tracking.store import is_database, psycopg_conninfo

TIMEOUT_S = 600  # a registration holds the lock for seconds; wait long before giving up
LEASE_S = 60  # a Prefect slot whose holder died is freed after this long
PREFECT_API_ENV = "PREFECT_API_URL"


@dataclass
class HeldLock:
    """Which lock serializes this registry, and when this process held it (epoch seconds)."""

    kind: str  # "postgresql" | "prefect" | "file"
    name: str
    acquired_at: float = 0.0
    released_at: float = 0.0

    def describe(self) -> str:
        scope = {
            "postgresql": "advisory lock on the tracking database, across machines",
            "prefect": "Prefect global concurrency limit, across machines",
            "file": "file lock, this machine only",
        }[self.kind]
        return f"{self.name} ({scope})"

    def held(self) -> str:
        return f"{self.acquired_at:.6f}-{self.released_at:.6f}"


def lock_kind(registry_uri: str) -> str:
    if is_database(registry_uri):
        return "postgresql"
    if os.environ.get(PREFECT_API_ENV):
        return "prefect"
    return "file"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def registry_lock(model_name: str, announce: bool = True) -> Iterator[HeldLock]:
    """Hold the registry's lock for ``model_name``; yields what was taken and when.

    The shared locks are keyed by the model name alone: the database or Prefect server
    already is the team's, and its clients reach it under different URLs (127.0.0.1 on the
    server's machine, a host name elsewhere). The file lock is keyed by the registry URI
    too (one machine may use several stores).
    """
    import mlflow

    uri = mlflow.get_registry_uri()
    kind = lock_kind(uri)
    if kind == "postgresql":
        key = _advisory_key(_key(f"registry|{model_name}"))
        held = HeldLock(kind, f"pg_advisory_lock({key})")
        acquire = _advisory_lock(uri, key)
    elif kind == "prefect":
        held = HeldLock(kind, f"registry-{model_name}")
        acquire = _prefect_slot(held.name)
    else:
        folder = Path(tempfile.gettempdir()) / "gpu-train-pipeline-locks"
        path = folder / f"registry-{_key(f'{uri}|{model_name}')[:16]}.lock"
        held = HeldLock(kind, str(path))
        acquire = _file_lock(path)
    with acquire:
        held.acquired_at = time.time()
        if announce:
            print(f"registry lock: {held.describe()}", flush=True)
        try:
            yield held
        finally:
            held.released_at = time.time()


def _advisory_key(key: str) -> int:
    """A signed 64-bit key, as pg_advisory_lock takes."""
    return int.from_bytes(bytes.fromhex(key[:16]), "big", signed=True)


@contextmanager
def _advisory_lock(uri: str, key: int) -> Iterator[None]:
    import psycopg

    try:
        connection = psycopg.connect(psycopg_conninfo(uri), autocommit=True, connect_timeout=30)
    except psycopg.OperationalError as error:  # kept as the cause: transient for retries
        raise RegistryLockError(
            f"could not reach the tracking database to take the registry lock: {error}"
        ) from error
    with connection:
        connection.execute(f"SET lock_timeout = '{TIMEOUT_S}s'")
        try:
            connection.execute("SELECT pg_advisory_lock(%s)", (key,))
            taken = True
        except psycopg.errors.LockNotAvailable:
            taken = False
        if not taken:  # raised outside the handler: a lock held this long is no hiccup
            raise RegistryLockError(
                f"the registry lock pg_advisory_lock({key}) was held by another client for "
                f"{TIMEOUT_S} s: see pg_locks on the tracking database for its holder"
            )
        try:
            yield
        finally:
            connection.execute("SELECT pg_advisory_unlock(%s)", (key,))


@contextmanager
def _prefect_slot(name: str) -> Iterator[None]:
    """One slot of a global concurrency limit of 1, created on first use."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = os.environ[PREFECT_API_ENV]
    # The server the environment names (it chose this lock), even in a process whose
    # Prefect settings were loaded before it was set.
    with temporary_settings(updates={PREFECT_API_URL: url}), ExitStack() as held:
        try:
            with get_client(sync_client=True) as client:
                with suppress(ObjectAlreadyExists):  # made by another client: the same lock
                    create = GlobalConcurrencyLimitCreate(name=name, limit=1)
                    client.create_global_concurrency_limit(create)
                limit = client.read_global_concurrency_limit_by_name(name)
        except httpx.HTTPError as error:  # kept as the cause: a connection error is transient
            raise RegistryLockError(
                f"could not reach the Prefect server {url} for the registry lock {name!r} "
                f"({error}): start it, or unset {PREFECT_API_ENV} to lock on this machine only"
            ) from error
        if limit.limit != 1 or not limit.active:
            state = "active" if limit.active else "inactive"
            raise RegistryLockError(
                f"the Prefect global concurrency limit {name!r} that locks the registry allows "
                f"{limit.limit} slot(s) and is {state}: set it back with "
                f"`prefect gcl update {name} --limit 1 --enable`"
            )
        slot = concurrency(
            name, occupy=1, timeout_seconds=TIMEOUT_S, lease_duration=LEASE_S, strict=True
        )
        try:
            held.enter_context(slot)
            taken = True
        except TimeoutError:  # only the wait for the slot: the work inside is not covered
            taken = False
        if not taken:  # raised outside the handler: a lock held this long is no hiccup
            raise RegistryLockError(
                f"the registry lock (Prefect global concurrency limit {name!r}) stayed taken "
                f"for {TIMEOUT_S} s: `prefect gcl inspect {name}` shows it"
            )
        yield


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, timeout=TIMEOUT_S):
        yield
