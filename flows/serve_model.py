"""`make serve-model`: a registered model over HTTP, with a credential.

    python -m flows.serve_model [MODEL_URI] [--runtime auto|onnx|mlflow] [--host H] [--port 5002]

Two runtimes answer the same protocol (MLflow's: POST /invocations with tensor JSON,
GET /ping, /health, /version):

- ``onnx``: the version's ONNX export (the export stage's exports/model.onnx, logged on the
  run that registered it) in ONNX Runtime behind a small ASGI app (tasks/serving/onnx_app.py);
  about 10x MLflow's throughput (BENCHMARKS.md, section 6).
- ``mlflow``: the same app `mlflow models serve` runs (MLflow's pyfunc scoring server) on the
  registered pyfunc, so requests and answers are exactly MLflow's.

An image model also takes PNG/JPEG files with either runtime (one file as the body, or TF
Serving's ``{"instances": [{"b64": ...}]}``), decoded with DALI as batch prediction does.

``auto`` (the default) takes ``onnx`` when the version has an ONNX export, else ``mlflow``.
Either way this adds what `mlflow models serve` lacks: every path but the liveness probes
(/ping, /health) requires the stack's credential (HTTP basic auth; the one `make serve`
uses, flows/stack/security.py), the request guards below, and a 127.0.0.1 bind unless told
otherwise. MODEL_URI defaults to the champion of the model params.yaml registers
(models:/<name>@champion); the tracking store is params.yaml's, or MLFLOW_TRACKING_URI's.
Only versions this project's register stage made are loaded (loading a pyfunc runs its code).
"""

from __future__ import annotations

import argparse
import base64
import gc
import hmac
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from flows.stack import security
from tasks import startup
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
    from tasks.config import load_config
    from tasks.tracking import store

    cfg = load_config(params) if uri is None or not os.environ.get(store.TRACKING_ENV) else None
    if uri is None:
        uri = f"models:/{cfg.register.model_name}@champion"
    parse_model_uri(uri)  # the plain form only, before anything is contacted
    store = os.environ.get(store.TRACKING_ENV) or store.tracking_uri(cfg.mlflow, Path.cwd())
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
    model = scoring_server.load_model_with_mlflow_config(str(local))
    app = scoring_server.init(model)
    [tensor] = model.metadata.get_input_schema().inputs
    if len(tensor.shape) == 4:  # an image model: PNG/JPEG files too, decoded as pixels
        from tasks.serving.onnx_app import ImageFilesAsTensors

        shape = tuple(int(d) for d in tensor.shape[1:])
        app.add_middleware(ImageFilesAsTensors, shape=shape, max_batch=MAX_FILES)
        app.state.image_files = True
    return app, exact


ONNX_EXPORT = "exports/model.onnx"  # where the export stage logs it on the registering run


def load_onnx_app(uri: str, store: str, scratch: Path, required: bool) -> tuple[Any, str] | None:
    """The ONNX app for the version ``uri`` names, with that version's exact URI; None when
    the version has no ONNX export and ``required`` is false (``--runtime auto``)."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from tasks.serving.onnx_app import OnnxImageClassifier, build_app
    from tasks.tracking import store as stores

    stores.client_defaults()
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    ref = parse_model_uri(uri)
    version = client.get_model_version(ref.name, resolve_version(client, ref, store))
    exact = f"models:/{ref.name}/{version.version}"
    model_dir = download_version(exact, store, scratch / "model")
    check_model_code(model_dir, exact)
    config = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    class_names = (config.get("config") or {}).get("class_names")
    try:
        onnx = mlflow.artifacts.download_artifacts(
            run_id=version.run_id,
            artifact_path=ONNX_EXPORT,
            dst_path=str(scratch / "onnx"),
            tracking_uri=store,
        )
    except (MlflowException, OSError):
        onnx = None
    if onnx is None or class_names is None:
        if not required:
            return None
        missing = "no class names (a language model)" if class_names is None else "no ONNX export"
        raise ModelRequestError(
            f"{exact} has {missing} (runs:/{version.run_id}/{ONNX_EXPORT}): export it "
            "(`dvc repro export`, with onnx in export.formats) or serve it with --runtime mlflow"
        )
    model = OnnxImageClassifier(Path(onnx), [str(name) for name in class_names])
    return build_app(model, exact, MAX_FILES), exact


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


MAX_BODY_MB = 8.0  # a batch of 256 CIFAR-sized images as JSON numbers is about 4 MB
MAX_DEPTH = 32  # JSON nesting: an image batch is 4 deep, MLflow's envelopes add 2
MAX_FILES = 256  # image files per request (JSON pixel batches: bounded by the body size)
JSON_TYPES = ("application/json",)
STRUCTURE = bytes(range(256)).translate(None, b"[]{}")  # every byte but brackets


def json_depth(body: bytes) -> int:
    """How deep ``body``'s brackets nest, at C speed (brackets inside strings count too:
    a false alarm needs dozens of unbalanced ones in one request's text)."""
    import numpy as np

    brackets = np.frombuffer(body.translate(None, STRUCTURE), dtype=np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def client_error(status: int, code: str, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def guard_requests(app: Any, max_body_bytes: int, files: bool = False) -> None:
    """What MLflow's scoring app leaves to a gateway: a body size limit (413), a JSON
    nesting limit checked before anything parses the body (deep nesting made its parser
    answer 500), JSON only (its CSV path answered 400 with a stack trace and file paths),
    error answers without stack traces, and an unexpected error as 500 with an id whose
    traceback goes to this server's log only. ``files``: PNG and JPEG bodies are taken too
    (the ONNX runtime decodes them)."""
    import logging
    import uuid

    from tasks.serving.onnx_app import IMAGE_TYPES, media_type

    log = logging.getLogger("serve_model")
    accepted = JSON_TYPES + (IMAGE_TYPES if files else ())

    @app.middleware("http")
    async def guard(request: Any, call_next: Any) -> Any:
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return client_error(411, "LENGTH_REQUIRED", "send a Content-Length header")
            if int(length) > max_body_bytes:
                return client_error(
                    413,
                    "REQUEST_TOO_LARGE",
                    f"the body is {int(length)} bytes; this server takes at most "
                    f"{max_body_bytes} (send smaller batches, or start it with --max-body-mb)",
                )
            kind = media_type(request.headers.get("content-type", ""))
            if kind not in accepted:
                return client_error(
                    415,
                    "UNSUPPORTED_MEDIA_TYPE",
                    f'send application/json (MLflow\'s tensor JSON, {{"inputs": ...}})'
                    f"{', image/png or image/jpeg' if files else ''}, "
                    f"not {kind[:60] or 'no Content-Type'}",
                )
            if kind in JSON_TYPES and json_depth(await request.body()) > MAX_DEPTH:
                return client_error(
                    400, "BAD_REQUEST", f"the JSON nests deeper than {MAX_DEPTH} levels"
                )

        def internal_error(*logged: Any) -> Any:
            """500 with an incident id; what happened goes to the log under that id."""
            incident = uuid.uuid4().hex[:12]
            log.error(
                "request %s failed (incident %s): %s",
                request.url.path,
                incident,
                logged,
                exc_info=sys.exc_info()[0] is not None,
            )
            message = f"internal error {incident}: see the model server's log"
            return client_error(500, "INTERNAL_ERROR", message)

        try:
            response = await call_next(request)
        except Exception:
            return internal_error()
        if response.status_code < 400 or "json" not in response.headers.get("content-type", ""):
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {"message": body.decode(errors="replace")[:500]}
        if isinstance(answer, dict) and "stack_trace" in answer:
            log.warning(
                "%s answered %s: %s",
                request.url.path,
                response.status_code,
                answer.pop("stack_trace"),
            )
        if response.status_code >= 500:  # never a server's internals in an answer
            return internal_error(response.status_code, answer)
        from fastapi.responses import JSONResponse

        return JSONResponse(answer, status_code=response.status_code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve_model", description=__doc__)
    parser.add_argument("model_uri", nargs="?", help="default: models:/<params' model>@champion")
    parser.add_argument(
        "--runtime",
        choices=("auto", "onnx", "mlflow"),
        default="auto",
        help="onnx: the version's ONNX export in ONNX Runtime (fast; also PNG/JPEG input); "
        "mlflow: MLflow's scoring server on the registered pyfunc; auto (default): onnx when "
        "the version has an ONNX export",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback)")
    parser.add_argument("--port", type=int, default=5002)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=MAX_BODY_MB,
        help="largest request body accepted, in MB (413 above it; default %(default)g)",
    )
    args = parser.parse_args(argv)
    if note := startup.prepare_process():
        print(note, file=sys.stderr)
    import uvicorn

    from tasks.config import ConfigError

    try:
        listening = listen(args.host, args.port)
    except OSError as error:
        print(
            f"error: cannot listen on {args.host}:{args.port} ({error.strerror or error}); "
            "stop what holds that port or pick another with --port (make serve-model "
            "MODEL_PORT=...)",
            file=sys.stderr,
        )
        return 2
    with listening, tempfile.TemporaryDirectory(prefix="serve-model-") as scratch:
        try:
            credential_file, credential = security.ensure_credential(Path.cwd(), dict(os.environ))
            uri, store = model_uri_and_store(args.model_uri, Path(args.params))
            loaded = None
            if args.runtime != "mlflow":
                loaded = load_onnx_app(uri, store, Path(scratch), args.runtime == "onnx")
            runtime = "onnx" if loaded else "mlflow"
            if loaded is None:
                startup.import_tensorflow()  # quietly: the pyfunc loads it
                loaded = load_scoring_app(uri, store, Path(scratch))
            app, exact = loaded
        except (ConfigError, ModelRequestError, security.CredentialError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        files = runtime == "onnx" or getattr(app.state, "image_files", False)
        # Inner: after the credential check.
        guard_requests(app, int(args.max_body_mb * 1e6), files=files)
        require_credential(app, credential)
        user = security.split_credential(credential)[0]
        print(
            f"serving {uri} ({exact}, {runtime} runtime) on "
            f"http://{args.host}:{args.port}/invocations "
            f"(user {user!r}, password in {credential_file})",
            flush=True,
        )
        # Everything loaded so far lives as long as the server: out of the collector's way,
        # so a full collection (requests allocate a Python object per JSON number) does not
        # walk MLflow's, pandas' and ONNX Runtime's module objects each time (p99 and the
        # mean, BENCHMARKS.md section 6).
        gc.collect()
        gc.freeze()
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[listening])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening before the model loads: a taken port fails
    at once, and the banner (printed once the model is loaded) is true the moment it shows;
    a client that connects earlier waits in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


if __name__ == "__main__":
    sys.exit(main())
