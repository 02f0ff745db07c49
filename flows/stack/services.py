"""The processes `make serve` supervises: start each in its own session, wait until it
answers, and stop them all (servers and worker first, then the stores they use).

Each service logs to .pipeline/serve/<service>.log; a failure message ends with that log.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 180  # each server is up in ~10 s here; generous for a busy machine
STOP_GRACE_S = 10  # between SIGTERM and SIGKILL
LOG_TAIL_CHARS = 3000
LOG_DIR = Path(".pipeline") / "serve"
RESTART_DELAY_S = 1.0


def exit_reason(code: int) -> str:
    """A Popen return code in words: "killed by SIGKILL", "status 1"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"


class ServeError(RuntimeError):
    """Something kept the stack from starting or running; the message says what and where."""


class PortInUse(ServeError):
    pass


PORT_FLAGS = {
    "MLflow server": "--mlflow-port",
    "Prefect server": "--prefect-port",
    "PostgreSQL": "--postgres-port",
    "S3 emulator": "--s3-port",
}
# What `make serve` / `make ui` users set instead of the flag (the Makefile passes it on).
MAKE_VARIABLES = {"MLflow server": "MLFLOW_PORT", "Prefect server": "PREFECT_PORT"}


@dataclass
class Service:
    name: str
    command: list[str]
    log: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    user: dict[str, Any] = field(default_factory=dict)  # Popen's user/groups (PostgreSQL)
    backing: bool = False  # a store the others use: stopped after them, by its own signal
    stop_signal: int = signal.SIGTERM
    max_restarts: int = 0  # times the launcher starts it again after it dies (PostgreSQL)
    ready: Callable[[], None] | None = None  # returns once a restarted service answers
    restarts: int = 0  # spent so far

    def start(self, cwd: Path) -> None:
        """Start in its own session, so Ctrl-C reaches the launcher only, which stops it."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.user,
            )

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def restart(self, cwd: Path, code: int) -> None:
        """Start it again after it died with ``code`` and wait until it answers; each try
        spends one of ``max_restarts``. Said on the launcher's output and in the service's
        log, so the outage is on record. Raises ServeError once no try is left."""
        while self.restarts < self.max_restarts:
            self.restarts += 1
            what = f"stopped unexpectedly ({exit_reason(code)}); restart {self.restarts}"
            print(f"{self.name} {what}", flush=True)
            with self.log.open("a") as log:
                log.write(f"--- flows.serve: {what}\n")
            time.sleep(RESTART_DELAY_S)  # a killed server's children need a moment to exit
            self.start(cwd)
            try:
                if self.ready is not None:
                    self.ready()
            except Exception:  # whatever the readiness check raises: try again, or give up
                stop_services([self])
                code = self.exit_code()
                code = -1 if code is None else code
                continue
            print(f"{self.name} is back", flush=True)
            return
        raise self.failure(
            f"stopped unexpectedly ({exit_reason(code)}) with its {self.restarts} restart(s) "
            "spent; stopping everything"
        )

    def failure(self, what: str) -> ServeError:
        tail = self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if self.log.exists() else ""
        return ServeError(f"{self.name} {what}; the end of {self.log}:\n{tail}")

    def family(self) -> list[Any]:
        """The service's process and all its descendants (flow runs of a worker too)."""
        import psutil

        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def stop_all(services: list[Service]) -> None:
    """Stop the servers and worker, then the stores they used (PostgreSQL, the emulator)."""
    stop_services([service for service in services if not service.backing])
    stop_services([service for service in services if service.backing])


def stop_services(services: list[Service]) -> None:
    """Signal every service and its descendants at once (a backing store: its main process
    only, which stops its own children); SIGKILL whatever outlives the grace."""
    import psutil

    family = []
    for service in services:
        processes = service.family()
        family += processes
        for process in processes[:1] if service.backing else processes:
            with suppress(psutil.Error):
                process.send_signal(service.stop_signal)
    _, alive = psutil.wait_procs(family, timeout=STOP_GRACE_S)
    for process in alive:
        with suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)
    for service in services:  # reap, so no zombie outlives the launcher
        if service.process is not None:
            with suppress(subprocess.TimeoutExpired):
                service.process.wait(timeout=STOP_GRACE_S)


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Refuse to start, naming the port and its flag, when something already listens there."""
    for name, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                choose = PORT_FLAGS[name]
                if name in MAKE_VARIABLES:
                    choose += f" (with make: {MAKE_VARIABLES[name]}=...)"
                raise PortInUse(
                    f"port {port} on {host} is in use ({error.strerror}), and the {name} "
                    f"needs it: stop what listens there (`ss -ltnp 'sport = :{port}'`) or "
                    f"choose another port with {choose}"
                ) from None


def http_get(url: str, credential: str | None = None, context: Any = None) -> Any:
    """GET ``url`` directly (its own host: no proxy); ``context``: the TLS trust for https."""
    handlers = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    direct = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url)
    if credential is not None:
        token = base64.b64encode(credential.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with direct.open(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


def wait_for(
    service: Service,
    url: str,
    ready: Any = None,
    credential: str | None = None,
    context: Any = None,
) -> None:
    """Wait until GET ``url`` answers (and ``ready(answer)`` holds) or the service dies."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if (code := service.exit_code()) is not None:
            raise service.failure(f"exited with status {code} while starting")
        with suppress(OSError, ValueError):
            answer = http_get(url, credential, context)
            if ready is None or ready(answer):
                return
        time.sleep(0.5)
    raise service.failure(f"was not ready at {url} after {STARTUP_TIMEOUT_S} s")
