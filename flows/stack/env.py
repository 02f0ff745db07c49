"""The environment of each process `make serve` starts: exactly the settings it needs.

The Prefect server gets Prefect's own security settings (basic auth with the stack's
credential, CORS for its own UI origin only, CSRF tokens); the MLflow server gets
MLflow's basic-auth app with the stack's user as admin; clients (the worker, the CLI
calls, a user's shell) get the credential to send. No process gets more than that.
"""

from __future__ import annotations

import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

from flows.stack import object_store, security
from tasks import startup

HEARTBEAT_S = 60  # seconds between a flow run's heartbeats under the stack's worker


@dataclass(frozen=True)
class Endpoints:
    """Where the stack listens, and the origins and Host headers its servers accept."""

    host: str
    prefect_port: int
    mlflow_port: int
    scheme: str = "http"  # "https" when the stack serves TLS (flows/stack/tls.py)

    @property
    def prefect_url(self) -> str:
        return f"{self.scheme}://{self.url_host}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"{self.scheme}://{self.url_host}:{self.mlflow_port}"

    @property
    def url_host(self) -> str:
        """The host as a URL writes it (an IPv6 address in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def names(self) -> list[str]:
        """The host names a browser may use for the stack (never a wildcard address)."""
        names = ["127.0.0.1", "localhost"]
        if self.host not in (*names, "0.0.0.0", "::"):
            names.append(self.host)
        return names

    def origins(self, port: int) -> str:
        return ",".join(f"{self.scheme}://{name}:{port}" for name in self.names())

    def hosts(self, port: int) -> str:
        return ",".join(f"{name}:{port}" for name in self.names())


# The object store's settings and credential: the MLflow server's alone (clients upload
# and download artifacts through it).
OBJECT_STORE_PREFIXES = ("AWS_", "MLFLOW_S3_")
DATABASE_URL_ENV = "PIPELINE_DATABASE_URL"  # may hold a password: never passed on


def base_env() -> dict[str, str]:
    """What every process of the stack gets: the caller's environment without credentials
    meant for one service, no telemetry."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(OBJECT_STORE_PREFIXES) and key != DATABASE_URL_ENV
    }
    for secret in (security.USER_CREDENTIAL_ENV, "PREFECT_API_AUTH_STRING"):
        env.pop(secret, None)  # each service gets exactly the credential it needs, below
    env.update(
        startup.NO_TELEMETRY,
        # MLflow's job runner (GenAI scorers) adds six processes the pipeline never uses.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, [env.get(key), "127.0.0.1", "localhost"]))
    return env


def client_env(
    ends: Endpoints, credential: str, mlflow_auth: bool, trust: dict[str, str] | None = None
) -> dict[str, str]:
    """A Prefect and MLflow client's environment: the worker's, the CLI calls', a user's.
    ``trust``: the variables that make them trust the stack's TLS certificate."""
    env = base_env() | (trust or {})
    env.update(
        PREFECT_API_URL=f"{ends.prefect_url}/api",
        PREFECT_API_AUTH_STRING=credential,
        MLFLOW_TRACKING_URI=ends.mlflow_url,  # the worker's flow runs log to the server
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S),  # flows.serve's zombie automation
        # Artifacts up and down through the server even when it keeps them in a bucket:
        # clients hold no bucket credential and need no route to the store.
        **object_store.MLFLOW_CLIENT_ENV,
    )
    if mlflow_auth:
        user, password = security.split_credential(credential)
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return env


def prefect_server_env(ends: Endpoints, credential: str) -> dict[str, str]:
    """Prefect's own security settings: basic auth, CORS for its UI only, CSRF tokens."""
    env = base_env()
    env.update(
        PREFECT_API_URL=f"{ends.prefect_url}/api",
        PREFECT_SERVER_API_AUTH_STRING=credential,
        PREFECT_SERVER_CORS_ALLOWED_ORIGINS=ends.origins(ends.prefect_port),
        PREFECT_SERVER_CSRF_PROTECTION_ENABLED="true",
        # `prefect deployment run --watch` shows the flow run's logs (its stage output and
        # the result line) beside the events only when the server streams them out; off
        # by default in Prefect 3.8, which leaves --watch with state events alone.
        PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true",
        PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true",
    )
    return env


def object_store_env() -> dict[str, str]:
    """The caller's object store settings (AWS_*, MLFLOW_S3_ENDPOINT_URL), for the server."""
    return {k: v for k, v in os.environ.items() if k.startswith(OBJECT_STORE_PREFIXES)}


def mlflow_server_env(project: Path, credential: str | None) -> dict[str, str]:
    """With ``credential``: MLflow's basic-auth app, its admin being the stack's user.
    The object store's credential is the MLflow server's alone."""
    env = base_env() | object_store_env()
    if credential is None:
        return env
    user, password = security.split_credential(credential)
    config = project / security.SECRETS_DIR / "mlflow-auth.ini"
    database = project / security.SECRETS_DIR / "mlflow-auth.db"  # users, password hashes
    security.write_secret(
        config,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"  # users the admin adds start with nothing
        f"database_uri = sqlite:///{database}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n",
    )
    if database.exists():
        sync_mlflow_admin(f"sqlite:///{database}", user, password)
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_USERNAME=user,
        MLFLOW_AUTH_ADMIN_PASSWORD=password,
        # Signs the UI's CSRF tokens; a new one per start only logs browsers out.
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
    )
    return env


def sync_mlflow_admin(database_uri: str, user: str, password: str) -> None:
    """A rotated credential: MLflow creates its admin only once, so update the password."""
    with warnings.catch_warnings():  # a deprecation inside MLflow's server, not ours to fix
        warnings.simplefilter("ignore")
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(database_uri)
    if store.has_user(user):
        store.update_user(user, password=password, is_admin=True)
