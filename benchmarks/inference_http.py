"""The served model's HTTP round trip, for benchmarks/inference.py: a real
`mlflow models serve` process on a loopback port, as the README runs it, and a client
POSTing to /invocations over one kept-alive connection.

Request bodies (raw pixels as JSON integers, N x H x W x C) are encoded before timing;
each timed call sends one and reads the whole answer. The first pass over the distinct
bodies is untimed and checks every answer's top-1 class against the Keras model's.
"""

from __future__ import annotations

import http.client
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
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import child_env

SERVER_READY_S = 300  # first answer came after ~22 s here; a loaded machine gets slack
DISTINCT_REQUESTS = 20  # different bodies per batch size, sent round and round
THREADS = "1 uvicorn worker (mlflow's default), TF default inside"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_args(model_uri: str, port: str) -> list[str]:
    """`mlflow models serve` arguments as the README gives them."""
    return [
        *("models", "serve", "-m", model_uri),
        *("--env-manager", "local", "-h", "127.0.0.1", "-p", port),
    ]


def server_command(model_uri: str) -> str:
    return shlex.join(["mlflow", *serve_args(model_uri, "PORT")])


def request_body(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": images.tolist()}).encode()


def post(conn: http.client.HTTPConnection, body: bytes) -> bytes:
    """One POST /invocations; the answer's body, read in full."""
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"/invocations answered HTTP {response.status}: {payload[:500]!r}")
    return payload


def wait_for_answer(port: int, body: bytes, server: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mlflow models serve exited {server.returncode}:\n{tail}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            post(conn, body)
            return
        except OSError:  # not listening yet
            time.sleep(0.25)
        finally:
            conn.close()
    raise RuntimeError(f"mlflow models serve gave no answer in {SERVER_READY_S} s: see {log_file}")


@contextmanager
def model_server(
    model_uri: str, store_uri: str, probe: bytes, scratch: Path
) -> Iterator[dict[str, Any]]:
    """The server, answering; yields its port, pid and seconds from start to the first
    answer. Its whole process group (it started it) is stopped on the way out."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), *serve_args(model_uri, str(port))]
    env = child_env(scratch) | {"MLFLOW_TRACKING_URI": store_uri}  # the venv's uvicorn first
    log_file = scratch / "serve.log"
    with log_file.open("wb") as out:
        start = time.perf_counter()
        server = subprocess.Popen(
            cmd, cwd=scratch, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_for_answer(port, probe, server, log_file)
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
    port: int, images: np.ndarray, keras_top1: np.ndarray, batch: int, calls: int
) -> dict[str, Any]:
    """``calls`` timed round trips at ``batch``, after one checked pass over the bodies."""
    distinct = min(DISTINCT_REQUESTS, len(images) // batch)
    bodies = [request_body(images[i * batch : (i + 1) * batch]) for i in range(distinct)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    agree = 0
    for i, body in enumerate(bodies):
        answer = json.loads(post(conn, body))["predictions"]
        top1 = np.array([row["class_index"] for row in answer])
        agree += int((top1 == keras_top1[i * batch : (i + 1) * batch]).sum())
    times_ms = []
    for call in range(calls):
        body = bodies[call % distinct]
        start = time.perf_counter()
        post(conn, body)
        times_ms.append((time.perf_counter() - start) * 1e3)
    conn.close()
    return {
        "times_ms": times_ms,
        "images_per_s_sequential": batch * len(times_ms) / (sum(times_ms) / 1e3),
        "request_bytes_mean": float(np.mean([len(b) for b in bodies])),
        "top1_agreement_with_keras": agree / (distinct * batch),
    }
