"""The team's shared services for the tests, as real processes on loopback.

PostgreSQL from the machine's own binaries (flows/stack/postgres.py's LocalPostgres, in a temp
folder the ``postgres`` account can reach) and moto's S3 emulator with a generated
credential (flows/stack/object_store.py). The test session owns both, so a test can restart
PostgreSQL under a running pipeline.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.stack import object_store, postgres
from tests.operate import free_port

STOP_TIMEOUT_S = 30
REPO = Path(__file__).resolve().parents[1]


@dataclass
class PostgresServer:
    cluster: postgres.LocalPostgres
    log: Path
    process: subprocess.Popen | None = None

    @classmethod
    def create(cls) -> PostgresServer:
        folder = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
        folder.chmod(0o755)  # the postgres account runs the server when tests run as root
        cluster = postgres.LocalPostgres(folder / "data", free_port(), secrets.token_urlsafe(18))
        try:
            cluster.init()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(cluster, folder / "postgres.log")

    @property
    def url(self) -> str:
        return self.cluster.url

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.cluster.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.cluster.process_user(),
            )
        self.cluster.wait_ready(lambda: self.process.poll() is None)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, as in a server restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            stop(self.process)

    def query(self, database: str, sql: str, *args: Any) -> list[tuple]:
        import psycopg

        with psycopg.connect(postgres.with_database(self.url, database)) as connection:
            return connection.execute(sql, args).fetchall()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.cluster.data_dir.parent, ignore_errors=True)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    credentials: object_store.S3Credentials
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)  # what a client of the store needs

    @classmethod
    def start(cls, bucket: str, log: Path) -> S3Server:
        import os

        port = free_port()
        # The emulator needs no AWS settings of the machine's (a real key must not reach it).
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        with log.open("ab") as out:
            process = subprocess.Popen(
                object_store.moto_command("127.0.0.1", port),
                cwd=REPO,
                env=object_store.moto_env(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            object_store.wait_until_up(endpoint)
            credentials = object_store.bootstrap(endpoint, bucket)
        except BaseException:
            process.terminate()
            stop(process)
            raise
        env = object_store.client_env(endpoint, credentials)
        return cls(endpoint, bucket, credentials, process, env)

    def keys(self, prefix: str = "") -> list[str]:
        return object_store.list_keys(self.endpoint, self.credentials, self.bucket, prefix)

    def stop(self) -> int:
        """Terminate the emulator; its exit status (0: it shut down cleanly)."""
        if self.process.poll() is None:
            self.process.terminate()
            stop(self.process)
        return self.process.returncode


def stop(process: subprocess.Popen) -> None:
    """Wait for a signalled process; SIGKILL it if it does not end in time."""
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
