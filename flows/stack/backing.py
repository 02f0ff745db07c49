"""What the servers keep their state in, started before them when asked: PostgreSQL
(--database-url, or --local-postgres) and an S3 bucket for MLflow artifacts
(--artifacts-destination, or --local-s3: moto's emulator with a generated credential).

MLflow's schema migrations run here, before its server starts (idempotent); Prefect's
server runs its own.
"""

from __future__ import annotations

import argparse
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.stack import object_store, postgres, security, tls
from flows.stack.env import base_env
from flows.stack.services import LOG_DIR, STARTUP_TIMEOUT_S, ServeError, Service

LOCAL_BUCKET = "pipeline"  # --local-s3: MLflow artifacts under mlflow/, a DVC remote under dvc/
S3_ENV_FILE = security.SECRETS_DIR / "s3.env"  # --local-s3: the emulator's credential, 0600


@dataclass
class Backing:
    """What the servers are backed by: None/"" means the SQLite and folder defaults."""

    databases: dict[str, str] | None = None  # "mlflow", "prefect": SQLAlchemy URLs
    artifacts: str | None = None
    s3_env: dict[str, str] = field(default_factory=dict)  # what the MLflow server reads


def start_backing(
    args: argparse.Namespace,
    project: Path,
    services: list[Service],
    certs: tls.TlsFiles | None = None,
) -> Backing:
    """Start --local-postgres / --local-s3 (appended to ``services``), create the databases
    and run MLflow's schema migrations (idempotent; Prefect's server runs its own). The S3
    emulator serves the servers' address, over HTTPS with their ``certs`` when they do."""
    backing = Backing(artifacts=args.artifacts_destination)
    database_url = args.database_url
    if args.local_postgres:
        cluster = postgres.local_cluster(project, args.postgres_port)
        service = Service(
            "PostgreSQL",
            cluster.command(),
            project / LOG_DIR / "postgres.log",
            base_env(),
            user=cluster.process_user(),
            backing=True,
            stop_signal=signal.SIGINT,  # PostgreSQL's fast shutdown
        )
        services.append(service)
        service.start(project)
        service.ready = lambda: cluster.wait_ready(lambda: service.exit_code() is None)
        service.ready()
        service.max_restarts = args.postgres_restarts
        database_url = cluster.url
    if args.local_s3:
        # On the servers' address and scheme: a worker host's DVC remote is this bucket.
        scheme, files = ("https", (certs.cert, certs.key)) if certs else ("http", None)
        endpoint = f"{scheme}://{args.host}:{args.s3_port}"
        cafile = str(certs.trust) if certs and certs.trust else None
        command = object_store.moto_command(args.host, args.s3_port, files)
        env = object_store.moto_env(base_env())
        service = Service("S3 emulator", command, project / LOG_DIR / "s3.log", env, backing=True)
        services.append(service)
        service.start(project)
        credentials = prepare_store(service, endpoint, cafile)
        backing.s3_env = object_store.client_env(endpoint, credentials)
        if cafile:  # botocore (MLflow's server, boto3, DVC's s3fs) trusts the stack's CA
            backing.s3_env["AWS_CA_BUNDLE"] = cafile
        env_lines = "".join(f"{key}={value}\n" for key, value in backing.s3_env.items())
        security.write_secret(project / S3_ENV_FILE, env_lines.rstrip("\n"))
        backing.artifacts = f"s3://{LOCAL_BUCKET}/mlflow"
    if database_url:
        backing.databases = postgres.ensure_databases(database_url)
        migrate_mlflow(backing.databases["mlflow"])
    return backing


def prepare_store(
    service: Service, endpoint: str, cafile: str | None = None
) -> object_store.S3Credentials:
    """Wait for the emulator (failing with its log if it dies), then give it its one
    credential and the bucket."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if (code := service.exit_code()) is not None:
            raise service.failure(f"exited with status {code} while starting")
        try:
            object_store.wait_until_up(endpoint, timeout_s=1, cafile=cafile)
            break
        except object_store.ObjectStoreError:
            if time.monotonic() > deadline:
                late = service.failure(f"was not up at {endpoint} after {STARTUP_TIMEOUT_S} s")
                raise late from None
    try:
        return object_store.bootstrap(endpoint, LOCAL_BUCKET, cafile)
    except Exception as error:  # botocore's and ours, the cause in the text
        raise service.failure(f"could not be given its credential and bucket ({error})") from error


def migrate_mlflow(url: str) -> None:
    """`mlflow db upgrade` (creates the schema on an empty database), in this process so
    the URL's password never shows in a process list."""
    import mlflow.db

    try:
        mlflow.db.upgrade.callback(url)
    except Exception as error:  # SQLAlchemy's and MLflow's own, with the cause in the text
        raise ServeError(
            f"MLflow's schema migration on {postgres.redacted(url)} failed: {error}"
        ) from error


PROXIED = "mlflow-artifacts:/"


def proxied_location(location: str, destination: str) -> str | None:
    """``location`` as the server with ``destination`` serves it (``mlflow-artifacts:/...``),
    or None when it lies outside ``destination`` (or is proxied already)."""
    if "://" in destination:
        prefixes = [destination.rstrip("/")]
    else:
        folder = Path(destination).resolve()
        prefixes = [folder.as_uri(), str(folder)]
    for prefix in prefixes:
        if location == prefix or location.startswith(prefix + "/"):
            return PROXIED + location[len(prefix) :].lstrip("/")
    return None


def proxy_experiments(backend: str, destination: str) -> list[str]:
    """Give every experiment whose artifacts lie in the server's ``destination`` the proxied
    location the server would have given it (``mlflow-artifacts:/...``), before the server
    starts: runs through the server then upload through it, whoever created the experiment
    first (a run on the local store does). MLflow has no API to change an experiment's
    location, so its table is updated; the experiment ids changed are returned."""
    import sqlalchemy

    if backend.startswith("sqlite:///") and not Path(backend[len("sqlite:///") :]).is_file():
        return []  # a new store: the server creates it, with proxied locations
    engine = sqlalchemy.create_engine(backend)
    try:
        if not sqlalchemy.inspect(engine).has_table("experiments"):
            return []  # a new store: the server creates it, with proxied locations
        with engine.begin() as connection:
            rows = connection.execute(
                sqlalchemy.text("SELECT experiment_id, artifact_location FROM experiments")
            ).all()
            moved = []
            for experiment_id, location in rows:
                proxied = proxied_location(location or "", destination)
                if proxied is None:
                    continue
                connection.execute(
                    sqlalchemy.text(
                        "UPDATE experiments SET artifact_location = :location "
                        "WHERE experiment_id = :id"
                    ),
                    {"location": proxied, "id": experiment_id},
                )
                moved.append(str(experiment_id))
            return moved
    finally:
        engine.dispose()
