"""`mlflow-artifacts:` locations on the project's own store, without its server.

An experiment used through the project's MLflow server keeps its artifacts behind the
server (`mlflow-artifacts:/...`, uploads and downloads proxied, so a worker on another
machine needs no path of the server's disk): `make serve` moves the experiments whose
location lies in its artifacts destination there when it starts (flows/stack/backing.py).
MLflow resolves such a location only through a tracking server. A stage, `make predict`
or `make reproduce` run straight on the project's store (SQLite, PostgreSQL) must still
read and write that experiment's artifacts: this repository, registered for the
`mlflow-artifacts` scheme through MLflow's `mlflow.artifact_repository` entry point, maps
them onto the folder the server keeps them in (params.yaml `mlflow.artifact_root`, named
in PIPELINE_LOCAL_ARTIFACTS by `tasks.tracking.tracking_uri`). Everywhere else (a server
as the tracking URI, no project store bound, a location naming its server) it is MLflow's
own MlflowArtifactsRepository.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOCAL_ARTIFACTS_ENV = "PIPELINE_LOCAL_ARTIFACTS"


def repository(
    artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
) -> Any:
    """MLflow's artifact-repository factory signature: the repository for ``artifact_uri``."""
    import mlflow
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    root = os.environ.get(LOCAL_ARTIFACTS_ENV)
    effective = tracking_uri or mlflow.get_tracking_uri()
    parts = urlsplit(artifact_uri)
    if not root or effective.startswith(("http://", "https://")) or parts.netloc:
        return MlflowArtifactsRepository(artifact_uri, tracking_uri, registry_uri)
    base = Path(root).resolve()
    path = (base / parts.path.lstrip("/")).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"{artifact_uri} points outside the artifact root {base}")
    return LocalArtifactRepository(path.as_uri(), tracking_uri, registry_uri)
