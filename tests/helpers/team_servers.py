"""The team's shared services for the tests, as real processes on loopback.

moto's S3 emulator with a generated credential (flows/stack/object_store.py), owned by the
test session; and a handle on the PostgreSQL the session's stack starts and supervises
itself (`--local-postgres`), to query it and to kill it under a running pipeline.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.stack import object_store, postgres
from tests.helpers.operate import free_port

STOP_TIMEOUT_S = 30
REPO = Path(__file__).resolve().parents[2]


@dataclass
class StackPostgres:
    """The PostgreSQL `flows.serve --local-postgres` started in a project: its URL from the
    project's secret, its postmaster from the cluster's lock file."""

    url: str
    data_dir: Path

    @classmethod
    def of(cls, project: Path) -> StackPostgres:
        password = (project / postgres.PASSWORD_FILE).read_text().strip()
        data_dir = project / postgres.STATE_DIR / "data"
        port = int((data_dir / "postmaster.pid").read_text().splitlines()[3])
        cluster = postgres.LocalPostgres(data_dir, port, password)
        return cls(cluster.url, data_dir)

    def postmaster(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])

    def kill(self) -> int:
        """SIGKILL the postmaster, as a crash would (its backends then exit on their own)."""
        pid = self.postmaster()
        os.kill(pid, signal.SIGKILL)
        return pid

    def query(self, database: str, sql: str, *args: Any) -> list[tuple]:
        import psycopg

        with psycopg.connect(postgres.with_database(self.url, database)) as connection:
            return connection.execute(sql, args).fetchall()


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    credentials: object_store.S3Credentials
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)  # what a client of the store needs

    @classmethod
    def start(cls, bucket: str, log: Path) -> S3Server:
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
