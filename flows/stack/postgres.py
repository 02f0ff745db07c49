"""PostgreSQL behind MLflow and Prefect: the databases on a team's server, or a local one.

`python -m flows.serve --database-url postgresql://USER:PASSWORD@HOST:PORT/DB` (or
PIPELINE_DATABASE_URL) puts MLflow's tracking store and Prefect's database on that
server, each in its own database, created when missing (the role needs CREATEDB, or an
administrator creates them first): ``pipeline_mlflow`` and ``pipeline_prefect``. DB is
only where the launcher connects to create them (``postgres`` exists on every server).

`make serve-pg` (``--local-postgres``) starts a throwaway PostgreSQL from the machine's
own binaries (Debian's ``postgresql`` package): a cluster under .pipeline/postgres/,
listening on 127.0.0.1 only, password authentication only, with a generated password
kept in .pipeline/secrets/postgres-password (mode 0600). It stops with everything else.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from flows.stack import security
from tasks.tracking.store import is_database, redacted

MLFLOW_DATABASE = "pipeline_mlflow"
PREFECT_DATABASE = "pipeline_prefect"
USER = "pipeline"  # the local cluster's superuser
STATE_DIR = Path(".pipeline") / "postgres"
PASSWORD_FILE = security.SECRETS_DIR / "postgres-password"
SERVICE_USER = "postgres"  # a cluster cannot run as root: Debian's account runs it then
READY_TIMEOUT_S = 60


class PostgresError(RuntimeError):
    """PostgreSQL could not be set up or reached; the message names the URL (never its
    password) or the binary, and what to do."""


def with_database(url: str, database: str, driver: str = "") -> str:
    """``url`` pointing at ``database``, with a SQLAlchemy driver suffix (``+asyncpg``)."""
    parts = urlsplit(url)
    if not is_database(url):
        raise PostgresError(
            f"--database-url {redacted(url)} is not a PostgreSQL URL: write it as "
            "postgresql://USER:PASSWORD@HOST:PORT/postgres"
        )
    return urlunsplit(parts._replace(scheme=f"postgresql{driver}", path=f"/{database}"))


def ensure_databases(url: str) -> dict[str, str]:
    """Create MLflow's and Prefect's databases when missing; their SQLAlchemy URLs."""
    import psycopg

    connect_to = with_database(url, urlsplit(url).path.lstrip("/") or "postgres")
    try:
        with psycopg.connect(connect_to, autocommit=True, connect_timeout=15) as connection:
            existing = {
                row[0] for row in connection.execute("SELECT datname FROM pg_database").fetchall()
            }
            for name in (MLFLOW_DATABASE, PREFECT_DATABASE):
                if name not in existing:
                    connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as error:
        raise PostgresError(
            f"could not prepare databases {MLFLOW_DATABASE} and {PREFECT_DATABASE} on "
            f"{redacted(url)}: {str(error).strip()} (the role needs CREATEDB, or create them "
            "yourself)"
        ) from error
    return {
        "mlflow": with_database(url, MLFLOW_DATABASE),
        "prefect": with_database(url, PREFECT_DATABASE, "+asyncpg"),
    }


def binaries() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian keeps them off PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise PostgresError(
        "no PostgreSQL server binaries found (/usr/lib/postgresql/*/bin or PATH): install "
        "them (`apt-get install postgresql`) or give --database-url of a running server"
    )


@dataclass
class LocalPostgres:
    """A cluster in ``data_dir`` on 127.0.0.1:``port``, its superuser ``pipeline``."""

    data_dir: Path
    port: int
    password: str

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/postgres"

    def process_user(self) -> dict[str, Any]:
        """Popen's user/group: PostgreSQL refuses to run as root, so then Debian's
        ``postgres`` account runs it (no wrapper process, so signals reach the server)."""
        if os.geteuid() != 0:
            return {}
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise PostgresError(
                f"running as root, PostgreSQL needs the {SERVICE_USER!r} account to run "
                "under: install Debian's postgresql package (it creates it), or start as "
                "another user"
            ) from None
        # No supplementary groups of root's: the server gets the postgres account's rights.
        return {"user": SERVICE_USER, "group": SERVICE_USER, "extra_groups": []}

    def init(self) -> None:
        """initdb once (a second start reuses the cluster and its password)."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = self.process_user()
        password_file = self.data_dir.parent / f".{self.data_dir.name}-initdb-password"
        password_file.unlink(missing_ok=True)
        with os.fdopen(
            os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w"
        ) as out:
            out.write(self.password)  # readable by its owner only from the first byte
        try:
            if run_as:
                shutil.chown(self.data_dir, SERVICE_USER, SERVICE_USER)
                shutil.chown(password_file, SERVICE_USER, SERVICE_USER)
            command = [str(binaries() / "initdb"), "-D", str(self.data_dir), "-U", USER]
            command += ["--pwfile", str(password_file), "--auth", "scram-sha-256"]
            command += ["--encoding", "UTF8", "--no-instructions"]
            done = subprocess.run(command, capture_output=True, text=True, check=False, **run_as)
        finally:
            password_file.unlink(missing_ok=True)
        if done.returncode != 0:
            raise PostgresError(
                f"initdb into {self.data_dir} failed (the {SERVICE_USER} account must be able "
                f"to reach that folder when running as root):\n{done.stdout}{done.stderr}"
            )

    def command(self) -> list[str]:
        """The server in the foreground (run it with ``process_user()``): its caller owns
        the process; SIGINT is PostgreSQL's fast shutdown."""
        command = [str(binaries() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        command += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        return command

    def wait_ready(
        self, alive: Callable[[], bool] = lambda: True, timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """Return once a password login works; raise when the server died or never came up."""
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError as error:
                if not alive() or time.monotonic() > deadline:
                    raise PostgresError(
                        f"PostgreSQL on 127.0.0.1:{self.port} did not come up: {error}"
                    ) from error
            time.sleep(0.2)


def local_cluster(project: Path, port: int) -> LocalPostgres:
    """The project's throwaway cluster: created on first use, its password kept 0600."""
    password_file = project / PASSWORD_FILE
    if password_file.exists():
        password = password_file.read_text().strip()
    else:
        password = secrets.token_urlsafe(24)
        security.write_secret(password_file, password)
    data_dir = project / STATE_DIR / "data"
    if not (data_dir / "PG_VERSION").exists() and data_dir.exists():
        shutil.rmtree(data_dir)  # a half-made cluster from an interrupted first start
    cluster = LocalPostgres(data_dir, port, password)
    cluster.init()
    return cluster
