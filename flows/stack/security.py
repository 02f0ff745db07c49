"""What keeps the served stack's API from being a remote shell: credential, job template, inputs.

- The stack's credential: one ``user:password`` line, generated on the first
  `make serve` (or taken from ``PREFECT_SERVER_API_AUTH_STRING``), stored 0600 in
  ``.pipeline/secrets/``. The Prefect server requires it (Prefect's own basic auth), the
  MLflow server requires it (MLflow's basic-auth app), the worker and the CLI send it.
- The work pool's base job template exposes no job variable: the Prefect server rejects
  a flow run that sets ``command``, ``env``, ``working_dir`` or anything else (422), and
  the worker's job configuration has no placeholder a variable could fill.
- A deployment run's path inputs stay inside the project: its workdir inside runs/, the
  params and profile files it reads and every store it writes to inside the project.
  The local CLI (``python -m flows.pipeline --workdir /anywhere``) is not restricted.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, PipelineConfig

SECRETS_DIR = Path(".pipeline") / "secrets"
CREDENTIAL_FILE = SECRETS_DIR / "api-credential"  # user:password, mode 0600
USER_CREDENTIAL_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # Prefect's own server setting
DEFAULT_USER = "pipeline"
MIN_PASSWORD_CHARS = 16
RUNS_DIR = "runs"

# The process work pool's base job template: no variables (and none accepted), and a job
# configuration without placeholders, so the worker starts every flow run with its own
# default command in the directory the deployment was registered from.
LOCKED_JOB_TEMPLATE: dict[str, Any] = {
    "job_configuration": {
        "command": None,
        "labels": {},
        "name": None,
        "stream_output": True,
        "working_dir": None,
    },
    "variables": {"type": "object", "properties": {}, "additionalProperties": False},
}

# params.yaml keys naming where a run writes (besides its own run directory).
WRITE_PATH_KEYS = ("data.tfds_dir", "mlflow.artifact_root")
LOCAL_URI_PREFIXES = ("sqlite:///", "file:")


class CredentialError(ValueError):
    """The supplied or stored credential is unusable; the message says how to fix it."""


def check_credential(value: str, origin: str) -> str:
    """``value`` if it is ``user:password`` with a long enough password, else a clear error."""
    user, sep, password = value.strip().partition(":")
    if not sep or not user or len(password) < MIN_PASSWORD_CHARS:
        raise CredentialError(
            f"{origin} must be 'user:password' with a password of at least "
            f"{MIN_PASSWORD_CHARS} characters (e.g. pipeline:$(openssl rand -hex 16))"
        )
    return value.strip()


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` with mode 0600 from the first byte, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_credential(project: Path, environ: dict[str, str]) -> tuple[Path, str]:
    """(credential file, ``user:password``): the user's from the environment, else the stored
    one, else a new random one. The file always ends up holding it, mode 0600, so the
    banner's ``$(cat FILE)`` exports work however it was supplied."""
    path = project / CREDENTIAL_FILE
    supplied = environ.get(USER_CREDENTIAL_ENV)
    if supplied:
        value = check_credential(supplied, USER_CREDENTIAL_ENV)
    elif path.is_file():
        value = check_credential(path.read_text(), str(path))
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)  # readable by others: close it before using it
        return path, value
    else:
        value = f"{DEFAULT_USER}:{secrets.token_urlsafe(24)}"
    write_secret(path, value)
    return path, value


def split_credential(value: str) -> tuple[str, str]:
    user, _, password = value.partition(":")
    return user, password


# --- deployment inputs ---------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def check_deployment_files(project: Path, workdir: Path, files: dict[str, str | None]) -> None:
    """Refuse, before anything is read, a deployment run whose run directory is not under
    ``runs/`` or whose ``files`` (parameter name -> path: params_path, profile) lie outside
    the project: an error message must not become a way to read the machine's files."""
    runs = project / RUNS_DIR
    if not (_inside(workdir, runs) and workdir.resolve() != runs.resolve()):
        raise ConfigError(
            f"workdir {str(workdir)!r}: a deployment run writes only inside {runs}/ "
            f"(e.g. runs/{{flow_run_id}}); run `python -m flows.pipeline --workdir ...` "
            "locally to write elsewhere"
        )
    for name, value in files.items():
        if value is not None and not _inside(project / value, project):
            raise ConfigError(
                f"{name} {value!r}: a deployment run reads config files only from the "
                f"project ({project}); pass a path inside it"
            )


def check_deployment_stores(
    project: Path, workdir: Path, cfg: PipelineConfig, tracking_env: str | None
) -> None:
    """Refuse a deployment run whose config writes outside the project: the dataset cache,
    the artifact root and a local tracking store (unless MLFLOW_TRACKING_URI, which the
    worker sets, overrides it). Reading data from anywhere (``data.idx_dir``) is allowed."""
    flat = cfg.flat(everything=True)
    for key in WRITE_PATH_KEYS:
        if not _inside(workdir / flat[key], project):
            raise ConfigError(
                f"{key}={flat[key]!r}: a deployment run writes only inside the project "
                f"({project}); use a path inside it"
            )
    uri = flat["mlflow.tracking_uri"]
    if not tracking_env and uri.startswith(LOCAL_URI_PREFIXES):
        local = uri.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:")
        if not _inside(workdir / local, project):
            raise ConfigError(
                f"mlflow.tracking_uri={uri!r}: a deployment run writes only inside the "
                f"project ({project}); use a store inside it or a tracking server"
            )
