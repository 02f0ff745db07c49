"""`make serve-model`: a registered model behind MLflow's scoring server, with a credential.

    python -m flows.serve_model [MODEL_URI] [--host 127.0.0.1] [--port 5002]

Runs in this process the same app `mlflow models serve` runs (MLflow's pyfunc scoring
server: POST /invocations, GET /ping, /health, /version), so requests and answers are
exactly MLflow's, and adds what `mlflow models serve` lacks: every path but the liveness
probes (/ping, /health) requires the stack's credential (HTTP basic auth; the one `make
serve` uses, flows/stack/security.py), and it binds 127.0.0.1 unless told otherwise. MODEL_URI
defaults to the champion of the model params.yaml registers (models:/<name>@champion);
the tracking store is params.yaml's, or MLFLOW_TRACKING_URI's. Only versions this
project's register stage made are loaded (loading a pyfunc runs its code).
"""

from __future__ import annotations

import argparse
import base64
import hmac
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from flows.stack import security
from tasks import console
from tasks.errors import ModelRequestError
from tasks.serving.registered import (
    check_model_code,
    download_version,
    parse_model_uri,
    resolve_version,
)

OPEN_PATHS = ("/ping", "/health")  # liveness probes: they reveal nothing about the model


def model_uri_and_store(uri: str | None, params: Path) -> tuple[str, str]:
    """The model URI to serve (default: the champion of params.yaml's model) and the
    tracking URI to resolve it in."""
    from tasks import tracking
    from tasks.config import load_config

    cfg = load_config(params) if uri is None or not os.environ.get(tracking.TRACKING_ENV) else None
    if uri is None:
        uri = f"models:/{cfg.register.model_name}@champion"
    parse_model_uri(uri)  # the plain form only, before anything is contacted
    store = os.environ.get(tracking.TRACKING_ENV) or tracking.tracking_uri(cfg.mlflow, Path.cwd())
    return uri, store


def load_scoring_app(uri: str, store: str, scratch: Path) -> tuple[Any, str]:
    """MLflow's scoring app (the one `mlflow models serve` runs) for the version ``uri``
    names, downloaded into ``scratch`` and loaded only if its code is this project's
    (tasks/serving/registered.py); with that version's exact URI."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    from tasks.tracking import store as stores

    stores.client_defaults()  # bounded retries; artifacts through the tracking server
    version = resolve_version(mlflow.MlflowClient(tracking_uri=store), parse_model_uri(uri), store)
    exact = f"models:/{parse_model_uri(uri).name}/{version}"
    local = download_version(exact, store, scratch)
    check_model_code(local, exact)
    return scoring_server.init(scoring_server.load_model_with_mlflow_config(str(local))), exact


def require_credential(app: Any, credential: str) -> None:
    """Answer 401 to any request without the credential, except the liveness probes."""
    from fastapi.responses import JSONResponse

    expected = "Basic " + base64.b64encode(credential.encode()).decode()

    @app.middleware("http")
    async def check(request: Any, call_next: Any) -> Any:
        sent = request.headers.get("authorization", "")
        if request.url.path in OPEN_PATHS or hmac.compare_digest(sent, expected):
            return await call_next(request)
        return JSONResponse(
            {
                "error_code": "UNAUTHENTICATED",
                "message": "this model server requires the "
                "stack's credential (HTTP basic auth, .pipeline/secrets/api-credential)",
            },
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="model"'},
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve_model", description=__doc__)
    parser.add_argument("model_uri", nargs="?", help="default: models:/<params' model>@champion")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback)")
    parser.add_argument("--port", type=int, default=5002)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if note := console.prepare_process():
        print(note, file=sys.stderr)
    console.import_tensorflow()
    import uvicorn

    from tasks.config import ConfigError

    with tempfile.TemporaryDirectory(prefix="serve-model-") as scratch:
        try:
            credential_file, credential = security.ensure_credential(Path.cwd(), dict(os.environ))
            uri, store = model_uri_and_store(args.model_uri, Path(args.params))
            app, exact = load_scoring_app(uri, store, Path(scratch))
        except (ConfigError, ModelRequestError, security.CredentialError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        require_credential(app, credential)
        user = security.split_credential(credential)[0]
        print(
            f"serving {uri} ({exact}) on http://{args.host}:{args.port}/invocations "
            f"(user {user!r}, password in {credential_file})",
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
