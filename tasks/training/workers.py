"""``train.distribute: multi_worker`` on one machine: the train stage as N local workers.

Without TF_CONFIG the train stage starts ``train.workers`` processes of itself
(``python -m flows.stage train``), each with a TF_CONFIG naming every worker on a free
loopback port and its own index, and the resolved config in a params file, so every
worker trains the same thing. Worker 0 is the chief: it tracks, writes the model and
history, and prints its output here; the others train in step and log to
``.pipeline/workers/worker-<i>.log``. If one dies, all are stopped and the stage fails
with the worker's name and its last lines. On several machines each host sets its own
TF_CONFIG and runs the same command itself (README "Multi-device and multi-machine
training"); this module is only the one-machine convenience.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from tasks.config import PipelineConfig
from tasks.errors import DistributeError
from tasks.workspace import Workspace, atomic_path

WORKERS_DIR = Path(".pipeline") / "workers"
LAST_LINES = 15  # of a failed worker's output, in the stage's error
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out on 127.0.0.1 now (held together, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(hosts: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


class _Worker:
    def __init__(self, index: int, process: subprocess.Popen[str], sink: IO[str]) -> None:
        self.index, self.process, self.sink = index, process, sink
        self.last: deque[str] = deque(maxlen=LAST_LINES)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.last.append(line.rstrip("\n"))
            self.sink.write(line)
            self.sink.flush()

    def describe_exit(self) -> str:
        code = self.process.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        lines = "\n".join(f"    {line}" for line in self.last) or "    (no output)"
        return f"worker {self.index} (pid {self.process.pid}) {how}; its last lines:\n{lines}"


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the stage process dies (even by SIGKILL), so no
    worker outlives it. Linux only; elsewhere the stage's own cleanup has to do."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_local_workers(cfg: PipelineConfig, ws: Workspace) -> None:
    """Start the workers, wait for all; stop all and raise if any fails."""
    import yaml

    count = cfg.train.workers
    if count < 2:
        raise DistributeError(
            f"train.workers is {count}: multi_worker on this machine needs at least 2 (or "
            "set TF_CONFIG and start one worker per machine yourself)"
        )
    folder = ws.root / WORKERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    params = folder / "params.yaml"  # the resolved config: overrides reach every worker
    with atomic_path(params) as tmp:
        tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    hosts = [f"127.0.0.1:{port}" for port in free_ports(count)]
    print(f"starting {count} local workers on {', '.join(hosts)} (worker 0 is the chief)")
    workers: list[_Worker] = []
    try:
        for index in range(count):
            sink = sys.stdout if index == 0 else (folder / f"worker-{index}.log").open("w")
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.stage", "train", "--params", str(params)],
                cwd=ws.root,
                env={**os.environ, "TF_CONFIG": tf_config(hosts, index)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=_die_with_parent,
            )
            workers.append(_Worker(index, process, sink))
        _wait(workers)
    finally:
        _stop(workers)


def _wait(workers: list[_Worker]) -> None:
    while True:
        failed = [w for w in workers if w.process.poll() not in (None, 0)]
        if failed:
            _stop(workers)
            first = min(failed, key=lambda w: w.index)
            raise DistributeError(f"{first.describe_exit()}\nall workers were stopped")
        if all(w.process.returncode == 0 for w in workers):
            for worker in workers:
                worker.reader.join()
            return
        time.sleep(0.2)


def _stop(workers: list[_Worker]) -> None:
    running = [w for w in workers if w.process.poll() is None]
    for worker in running:
        worker.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for worker in running:
        try:
            worker.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
    for worker in workers:
        worker.reader.join(timeout=5)
        if worker.sink is not sys.stdout:
            worker.sink.close()
