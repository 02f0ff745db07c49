"""The served model's HTTP round trip, for benchmarks/inference.py: each way the project
serves a registered version as a real process on a loopback port, and a client POSTing to
/invocations over one kept-alive connection.

Servers: `mlflow models serve` as the README runs it, `python -m flows.serve_model` (what
`make serve-model` runs: the stack's credential checked on every request) with each of its
runtimes, MLflow's scoring app and the ONNX app, and, given a virtualenv that has it,
MLServer with its MLflow runtime (`mlserver start`, configured by MLSERVER_* variables as
`mlflow models serve --enable-mlserver` did before MLflow removed that option after 3.12;
MLServer 1.7.1 needs fastapi < 0.116, the project pins 0.150 for Prefect, so it cannot
share the project's environment; benchmarks/mlserver-requirements.txt builds one).
Inputs: raw pixels as JSON integers
(N x H x W x C, MLflow's tensor JSON), and, where the server takes files, the same test
images as PNG files (one file as the body at batch 1; TF Serving's ``{"instances": [{"b64":
...}]}`` above). Bodies are encoded before timing; each timed call sends one and reads the
whole answer. The first pass over the distinct bodies is untimed and checks every answer's
top-1 class against the Keras model's.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, child_env

SERVER_READY_S = 300  # first answer came after ~22 s here; a loaded machine gets slack
DISTINCT_REQUESTS = 20  # different bodies per batch size, sent round and round
CREDENTIAL = "bench:http-benchmark-credential"  # the server's and the client's, this run only


@dataclass(frozen=True)
class Server:
    key: str
    args: tuple[str, ...]  # after the program; PORT and MODEL are filled in
    module: bool  # `python -m ...` (else the venv's `mlflow` script)
    threads: str
    files: bool = False  # takes PNG files
    credential: bool = False
    mlserver: bool = False  # MLServer's CLI from the virtualenv given as mlserver_venv

    def command(self, model_uri: str, port: str, mlserver_venv: Path | None = None) -> list[str]:
        args = [a.replace("MODEL", model_uri).replace("PORT", port) for a in self.args]
        if self.mlserver:
            return [str(Path(mlserver_venv or "MLSERVER_VENV") / "bin" / "mlserver"), *args]
        if self.module:
            return [sys.executable, "-m", *args]
        return [str(Path(sys.executable).parent / "mlflow"), *args]

    def shown(self, model_uri: str) -> str:
        if self.mlserver:
            settings = " ".join(f"{k}={v}" for k, v in mlserver_env(model_uri, "PORT").items())
            return f"{settings} mlserver {' '.join(self.args)}"
        program = ["python", "-m"] if self.module else ["mlflow"]
        return shlex.join([*program, *self.command(model_uri, "PORT")[len(program) :]])


SERVERS = (
    Server(
        "http_mlflow_models_serve",
        (
            "models",
            "serve",
            "-m",
            "MODEL",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            "PORT",
        ),
        module=False,
        threads="1 uvicorn worker (mlflow's default), TF default inside",
    ),
    Server(
        "http_serve_model_mlflow",
        ("flows.serve_model", "MODEL", "--runtime", "mlflow", "--port", "PORT"),
        module=True,
        threads="1 uvicorn worker, TF default inside",
        credential=True,
    ),
    Server(
        "http_serve_model_onnx",
        ("flows.serve_model", "MODEL", "--runtime", "onnx", "--port", "PORT"),
        module=True,
        threads="1 uvicorn worker, ONNX Runtime default (physical cores)",
        files=True,
        credential=True,
    ),
)
MLSERVER = Server(
    "http_mlserver",
    ("start", "."),  # run in an empty folder: no settings.json, the variables configure it
    module=False,
    threads="MLServer 1.7.1 + mlserver-mlflow, 1 inference worker process (its default), "
    "no adaptive batching (its default; it applies to V2 /infer only), TF default inside",
    mlserver=True,
)
MLSERVER_MODEL_NAME = "classifier"


def mlserver_env(model_uri: str, port: str, grpc_port: str = "0", metrics_port: str = "0"):
    """MLServer's settings for serving ``model_uri`` with its MLflow runtime on loopback."""
    return {
        "MLSERVER_HOST": "127.0.0.1",  # its default is 0.0.0.0
        "MLSERVER_HTTP_PORT": port,
        "MLSERVER_GRPC_PORT": grpc_port,
        "MLSERVER_METRICS_PORT": metrics_port,
        "MLSERVER_MODEL_NAME": MLSERVER_MODEL_NAME,
        "MLSERVER_MODEL_IMPLEMENTATION": "mlserver_mlflow.MLflowRuntime",
        "MLSERVER_MODEL_URI": model_uri,
    }


class NotReady(RuntimeError):
    """The server listens but has not loaded the model yet (MLServer: 404 until then)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(encoded, "PNG")
    return encoded.getvalue()


def request_body(images: np.ndarray, files: bool = False) -> tuple[bytes, str]:
    """(body, content type) for ``images``: JSON pixels, or PNG files."""
    if not files:
        return json.dumps({"inputs": images.tolist()}).encode(), "application/json"
    if len(images) == 1:
        return png(images[0]), "image/png"
    instances = [{"b64": base64.b64encode(png(image)).decode()} for image in images]
    return json.dumps({"instances": instances}).encode(), "application/json"


def headers(server: Server, content_type: str) -> dict[str, str]:
    sent = {"Content-Type": content_type}
    if server.credential:
        sent["Authorization"] = "Basic " + base64.b64encode(CREDENTIAL.encode()).decode()
    return sent


def post(conn: http.client.HTTPConnection, body: bytes, sent: dict[str, str]) -> bytes:
    """One POST /invocations; the answer's body, read in full."""
    conn.request("POST", "/invocations", body=body, headers=sent)
    response = conn.getresponse()
    payload = response.read()
    if response.status in (404, 503):
        raise NotReady(f"/invocations answered HTTP {response.status}: {payload[:500]!r}")
    if response.status != 200:
        raise RuntimeError(f"/invocations answered HTTP {response.status}: {payload[:500]!r}")
    return payload


def wait_for_answer(
    port: int, body: bytes, sent: dict[str, str], server: subprocess.Popen, log_file: Path
) -> None:
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the model server exited {server.returncode}:\n{tail}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            post(conn, body, sent)
            return
        except (OSError, NotReady):  # not listening, or the model not loaded, yet
            time.sleep(0.25)
        finally:
            conn.close()
    raise RuntimeError(f"the model server gave no answer in {SERVER_READY_S} s: see {log_file}")


@contextmanager
def model_server(
    spec: Server,
    model_uri: str,
    store_uri: str,
    probe: np.ndarray,
    scratch: Path,
    mlserver_venv: Path | None = None,
) -> Iterator[dict[str, Any]]:
    """The server, answering; yields its port, pid and seconds from start to the first
    answer. Its whole process group (it started it) is stopped on the way out."""
    port = free_port()
    cmd = spec.command(model_uri, str(port), mlserver_venv)
    env = child_env(scratch) | {"MLFLOW_TRACKING_URI": store_uri}  # the venv's uvicorn first
    if spec.mlserver:
        env |= mlserver_env(model_uri, str(port), str(free_port()), str(free_port()))
        cwd = scratch / "mlserver"
        cwd.mkdir(exist_ok=True)
    else:
        env |= {"PREFECT_SERVER_API_AUTH_STRING": CREDENTIAL, "PYTHONPATH": str(REPO)}
        cwd = scratch
    log_file = scratch / f"{spec.key}.log"
    body, content_type = request_body(probe)
    with log_file.open("wb") as out:
        start = time.perf_counter()
        server = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_for_answer(port, body, headers(spec, content_type), server, log_file)
        yield {"port": port, "pid": server.pid, "first_answer_s": time.perf_counter() - start}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def tree_rss_mib(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def round_trips(
    spec: Server,
    port: int,
    images: np.ndarray,
    keras_top1: np.ndarray,
    batch: int,
    calls: int,
    files: bool,
) -> dict[str, Any]:
    """``calls`` timed round trips at ``batch``, after one checked pass over the bodies."""
    distinct = min(DISTINCT_REQUESTS, len(images) // batch)
    encoded = [request_body(images[i * batch : (i + 1) * batch], files) for i in range(distinct)]
    bodies = [body for body, _ in encoded]
    sent = headers(spec, encoded[0][1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    agree = 0
    for i, body in enumerate(bodies):
        answer = json.loads(post(conn, body, sent))["predictions"]
        top1 = np.array([row["class_index"] for row in answer])
        agree += int((top1 == keras_top1[i * batch : (i + 1) * batch]).sum())
    times_ms = []
    for call in range(calls):
        body = bodies[call % distinct]
        start = time.perf_counter()
        post(conn, body, sent)
        times_ms.append((time.perf_counter() - start) * 1e3)
    conn.close()
    return {
        "times_ms": times_ms,
        "images_per_s_sequential": batch * len(times_ms) / (sum(times_ms) / 1e3),
        "request_bytes_mean": float(np.mean([len(b) for b in bodies])),
        "top1_agreement_with_keras": agree / (distinct * batch),
    }
