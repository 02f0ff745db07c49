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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.project import module_command

BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 240  # servers start in ~15 s here; a cold, loaded CI machine gets slack
RUN_TIMEOUT_S = 420  # one tiny pipeline run takes ~30 s; concurrent ones share 2 cores
STOP_TIMEOUT_S = 60
# What a client shell needs from the banner (the credential by reference to its file).
CLIENT_KEYS = (
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
)


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
    second_worker_log: Path | None = None  # the other machine's worker (tests/fixtures/servers.py)

    def prefect(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def credential(self) -> str:
        return self.env["PREFECT_API_AUTH_STRING"]

    @contextmanager
    def http(self) -> Iterator[httpx.Client]:
        """A Prefect API client as the UI is one: the credential, then a CSRF token."""
        user, password = self.credential.split(":", 1)
        with httpx.Client(
            base_url=self.prefect_api, auth=(user, password), timeout=30, trust_env=False
        ) as client:
            client_id = str(uuid.uuid4())
            token = client.get("/csrf-token", params={"client": client_id})
            token.raise_for_status()
            client.headers.update(
                {"Prefect-Csrf-Token": token.json()["token"], "Prefect-Csrf-Client": client_id}
            )
            yield client

    def api(self, path: str) -> Any:
        with self.http() as client:
            response = client.get(f"/{path}")
        response.raise_for_status()
        return response.json()

    def api_post(self, path: str, body: dict[str, Any]) -> Any:
        with self.http() as client:
            response = client.post(f"/{path}", json=body)
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


def start_stack(
    root: Path, home: Path, args: tuple[str, ...] = (), server_env: dict[str, str] | None = None
) -> Stack:
    """`python -m flows.serve ARGS` on two free ports; returns once it prints its banner.

    ``server_env`` (a database URL, the object store's credential) reaches the launcher
    only, not the clients' environment (``Stack.env``)."""
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
    command = module_command("flows.serve", "--prefect-port", str(prefect_port))
    command += ["--mlflow-port", str(mlflow_port), *args]
    process = subprocess.Popen(
        command,
        cwd=root,
        env=env | (server_env or {}),
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
            if line.strip().startswith("prefect deployment run"):  # the banner's last line
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_stack(stack)
            raise AssertionError(f"flows.serve did not come up:\n{stack.logs()}")
    stack.env |= banner_exports(stack)
    return stack


def start_worker(stack: Stack, name: str, tmp: Path, log: Path) -> subprocess.Popen:
    """Another `prefect worker start` on the stack's work pool, as on a second machine:
    the client environment the banner gives, its own temp folder (so no file lock is
    shared with the first worker), one flow run at a time."""
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "local-process"]
    command += ["--type", "process", "--limit", "1", "--name", name]
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=stack.root,
            env=stack.env | {"TMPDIR": str(tmp)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def banner_exports(stack: Stack) -> dict[str, str]:
    """What the banner's `export` lines set when pasted into bash, as the README says to."""
    exports = [line.strip() for line in stack.output if line.strip().startswith("export ")]
    assert exports, f"no export lines in the banner:\n{''.join(stack.output)}"
    shown = subprocess.run(
        ["bash", "-c", "\n".join([*exports, "env -0"])],
        cwd=stack.root,
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env = dict(item.split("=", 1) for item in shown.split("\0") if "=" in item)
    return {key: env[key] for key in CLIENT_KEYS if key in env}


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
