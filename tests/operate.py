"""Helpers for the real-process tests: free ports, the `flows.serve` stack, the Prefect CLI.

The stack is the README's `make serve` (`python -m flows.serve`) run in a git copy of the
repository with a temporary PREFECT_HOME, so nothing touches the developer's servers,
stores or outputs. Tests drive it with the same `prefect` commands the README shows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 240  # servers start in ~15 s here; a cold, loaded CI machine gets slack
RUN_TIMEOUT_S = 420  # one tiny pipeline run takes ~30 s; concurrent ones share 2 cores
STOP_TIMEOUT_S = 60


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    prefect_api: str
    mlflow_uri: str
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)

    def prefect(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def api(self, path: str) -> Any:
        response = httpx.get(f"{self.prefect_api}/{path}", timeout=30, trust_env=False)
        response.raise_for_status()
        return response.json()

    def api_post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.prefect_api}/{path}", json=body, timeout=30, trust_env=False)
        response.raise_for_status()
        return response.json()

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self.api(f"flow_runs/{flow_run_id}")

    def api_flow_runs(self) -> list[dict[str, Any]]:
        return self.api_post("flow_runs/filter", {})

    def api_post_artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        """The artifacts of one flow run (its task runs' included)."""
        body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        return self.api_post("artifacts/filter", body)

    def logs(self) -> str:
        """serve's own output and the tail of each service log, for failure messages."""
        parts = ["".join(self.output)]
        for log in sorted((self.root / ".pipeline" / "serve").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def deployment_run_args(name: str, parameters: dict[str, Any]) -> list[str]:
    """`prefect deployment run NAME -p key=<json> ... --watch`, as the README writes it."""
    args = ["deployment", "run", name, "--watch", "--watch-timeout", str(RUN_TIMEOUT_S)]
    for key, value in parameters.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    return args


def flow_run_id(cli_output: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", cli_output)
    assert match, f"no flow run id in:\n{cli_output}"
    return match.group(1)


def start_stack(root: Path, home: Path) -> Stack:
    """`python -m flows.serve` on two free ports; returns once it prints its banner."""
    prefect_port, mlflow_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker picks up runs within ~2 s
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "flows.serve", "--prefect-port", str(prefect_port)]
    command += ["--mlflow-port", str(mlflow_port)]
    process = subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: a test failure cannot orphan it
    )
    stack = Stack(root, env, env["PREFECT_API_URL"], f"http://127.0.0.1:{mlflow_port}", process)
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            stack.output.append(line)
            if line.startswith("Serving on"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_stack(stack)
            raise AssertionError(f"flows.serve did not come up:\n{stack.logs()}")
    return stack


def stop_stack(stack: Stack) -> list[int]:
    """Ctrl-C the launcher as a user would; return the pids of its processes still alive."""
    import psutil

    try:
        family = psutil.Process(stack.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGINT)
    try:
        stack.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(stack.process.pid, signal.SIGKILL)
        stack.process.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    for process in alive:  # never leave strays behind, even when the assertion fails
        process.kill()
    return [process.pid for process in alive]
