"""A warm process for the stages of one `dvc repro`: each stage's libraries load once.

Under `dvc repro` every stage is its own `python -m flows.stage NAME` process, and each
one spent seconds importing TensorFlow, DALI and MLflow before any work (BENCHMARKS.md,
section 3: 27 s of a 79 s one-epoch run). So when DVC runs a stage (DVC_STAGE is set),
the stage process hands its work to a *stage host*: a process of this project's code that
has those libraries loaded and runs the stage's `flows.stage.main` in itself, on the stage
process's own stdin, stdout and stderr (passed over a Unix socket), in its directory, with
its environment and arguments, and answers its exit status. DVC sees nothing else: the
stage process runs as long as its stage, prints what it printed, exits with its status.

- The first stage of a `dvc repro` finds no host, runs itself as before and starts one in
  the background, which loads the libraries while that stage works. The host serves one
  stage at a time and exits after IDLE_S without one, after any stage that did not exit 0
  (a fresh process for whatever comes next), and when this project's code changes: a
  host serves only the code, interpreter and environment it started with (its socket's
  name is a hash of them).
- Ctrl-C or SIGTERM to the stage process reaches the stage in the host (the MLflow run ends
  KILLED, as in its own process); a stage process that dies (SIGKILL) takes the host down
  with it at once, like the process it stands for.
- Not used for multi-worker training (each worker is a process TF_CONFIG describes), nor
  outside DVC. `PIPELINE_STAGE_HOST=0` runs every stage in its own process.
- The host is `python -m flows.stage --serve-stages SOCKET`; beside its socket, SOCKET's
  name with .log holds its own output and one line per stage it ran.

The socket lives in a directory only this user can enter, and the host answers only
connections from this user; a request carries the stage's arguments (parsed by
flows.stage's argparse), directory and environment, as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

SWITCH = "PIPELINE_STAGE_HOST"  # "0": every stage in its own process
IDLE_S = 15.0  # DVC starts the next stage within a second or two of the last
LAST_STAGE = "export"  # dvc.yaml's last: nothing runs after it
CODE_DIRS = ("flows", "tasks")
# Read when the libraries load, so a host serves only stages that have the same values.
LOAD_TIME_ENV = (
    "PYTHONPATH",
    "CUDA_VISIBLE_DEVICES",
    "TF_CPP_MIN_LOG_LEVEL",
    "TF_ENABLE_ONEDNN_OPTS",
    "TF_FORCE_GPU_ALLOW_GROWTH",
    "XLA_FLAGS",
    "KERAS_HOME",
    "KERAS_BACKEND",
)
REPO = Path(__file__).resolve().parents[1]


def wanted(argv: list[str], env: dict[str, str]) -> bool:
    """Whether this stage goes to a host: under DVC, not switched off, not a worker of
    multi-worker training (TF_CONFIG here, or train.distribute in the params)."""
    if "DVC_STAGE" not in env or env.get(SWITCH, "1") == "0" or "TF_CONFIG" in env:
        return False
    params = Path(argv[argv.index("--params") + 1] if "--params" in argv[:-1] else "params.yaml")
    try:
        import yaml

        distribute = (yaml.safe_load(params.read_text()) or {}).get("train", {}).get("distribute")
    except (OSError, ValueError, AttributeError):
        return False  # the stage reports a broken params file itself
    return distribute != "multi_worker"


def host_key(env: dict[str, str]) -> str:
    """The code, interpreter and load-time environment a host serves."""
    digest = hashlib.sha256()
    digest.update(f"{sys.executable}\0{REPO}\0".encode())
    for name in LOAD_TIME_ENV:
        digest.update(f"{name}={env.get(name)}\0".encode())
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    return digest.hexdigest()[:32]


def socket_path(key: str) -> Path:
    """A socket in a directory only this user can enter (made so, or refused)."""
    folder = Path(tempfile.gettempdir()) / f"gpu-train-pipeline-stagehost-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    owned = folder.stat()
    if owned.st_uid != os.getuid() or owned.st_mode & 0o077:
        raise PermissionError(f"{folder} is not this user's alone")
    return folder / f"{key}.sock"


# ---------------------------------------------------------------- messages: 4-byte length + JSON


def send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    framed = struct.pack(">I", len(data)) + data
    sent = socket.send_fds(conn, [framed], fds) if fds else 0
    conn.sendall(framed[sent:])


def receive(conn: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One message (None when the other side closed) and any file descriptors with it."""
    fds: list[int] = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    else:
        head = conn.recv(4)
    while head and len(head) < 4:
        more = conn.recv(4 - len(head))
        if not more:
            return None, fds
        head += more
    if len(head) < 4:
        return None, fds
    (size,) = struct.unpack(">I", head)
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


# ------------------------------------------------------------------------- the stage process

HOST_FLAG = "--serve-stages"  # `python -m flows.stage --serve-stages SOCKET`: a host


def entry(argv: list[str], main: Callable[[list[str]], int]) -> int:
    """`python -m flows.stage ...`: a stage (``main``), or a host of stages."""
    if argv[:1] == [HOST_FLAG] and len(argv) == 2:
        return serve(Path(argv[1]), main)
    return run_stage(argv, main)


def run_stage(argv: list[str], main: Callable[[list[str]], int]) -> int:
    """`python -m flows.stage ARGV`: in a host when one serves this code, else here (and
    start a host for the stages after this one)."""
    env = dict(os.environ)
    if not wanted(argv, env):
        return main(argv)
    try:
        path = socket_path(host_key(env))
    except OSError:
        return main(argv)
    status = in_host(path, argv, env)
    if status is None:
        if argv[:1] != [LAST_STAGE]:  # no stage follows the last one: nothing to warm up for
            start_host(path, env)
        return main(argv)
    return status


def in_host(path: Path, argv: list[str], env: dict[str, str]) -> int | None:
    """The stage's exit status from the host at ``path``; None if no host answers."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        request = {"argv": argv, "cwd": os.getcwd(), "env": env}
        send(conn, request, [0, 1, 2])
        accepted, _ = receive(conn)  # once the host has loaded its libraries
    except OSError:
        conn.close()
        return None
    except KeyboardInterrupt:  # before the stage started: nothing of it to stop
        print(f"stage {argv[0]!r} stopped by SIGINT", file=sys.stderr)
        return 130
    if accepted is None:  # the host was leaving (idle, or another code): run it here
        conn.close()
        return None
    pid = accepted["pid"]

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    answer, _ = receive(conn)
    conn.close()
    if answer is None:
        print(
            f"error: the stage host (pid {pid}) ended while running this stage; rerun with "
            f"{SWITCH}=0 to run each stage in its own process",
            file=sys.stderr,
        )
        return 1
    return int(answer["status"])


def start_host(path: Path, env: dict[str, str]) -> None:
    """A host for this code, detached: its own session, no terminal, none of our pipes."""
    env = {key: value for key, value in env.items() if key != "DVC_STAGE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log = path.with_suffix(".log")
    with contextlib.suppress(OSError), log.open("ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "flows.stage", HOST_FLAG, str(path)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


# ---------------------------------------------------------------------------------- the host


def serve(path: Path, main: Callable[[list[str]], int]) -> int:
    """Serve stages (``main``) on ``path`` until IDLE_S pass without one."""
    import fcntl

    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 (held for the host's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another host serves this code already
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)  # a stage that connects while the libraries load waits for them
    try:
        warm_up()
        listener.settimeout(IDLE_S)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return 0
            with conn:
                if not same_user(conn):
                    continue
                if serve_one(conn, main) != 0:
                    return 0  # a failed or stopped stage: the next one gets a fresh process
    finally:
        path.unlink(missing_ok=True)
        listener.close()


def warm_up() -> None:
    """What the stages load: TensorFlow (quietly), Keras, DALI, MLflow and its store."""
    from tasks import startup

    startup.prepare_process()
    startup.import_tensorflow()
    import keras  # noqa: F401
    import mlflow  # noqa: F401
    import nvidia.dali  # noqa: F401
    from mlflow.store.tracking import sqlalchemy_store  # noqa: F401


def same_user(conn: socket.socket) -> bool:
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", credentials)
    return uid == os.getuid()


def serve_one(conn: socket.socket, main: Callable[[list[str]], int]) -> int:
    """Run one stage as its process would; return its exit status."""
    request, fds = receive(conn, with_fds=True)
    if request is None or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return 0
    send(conn, {"pid": os.getpid()})
    started = time.monotonic()
    finished = threading.Event()

    def watch() -> None:  # the stage process died: so does its stage, at once
        with contextlib.suppress(OSError):
            conn.recv(1)
        if not finished.is_set():
            os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    environ, cwd, argv = dict(os.environ), os.getcwd(), sys.argv
    status = 1
    try:
        for source, target in zip(fds, (0, 1, 2), strict=True):
            os.dup2(source, target)
            os.close(source)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["flows.stage", *request["argv"]]
        status = run_main(main, request["argv"])
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        finished.set()
        for fd, target in zip(saved, (0, 1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.argv = argv
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        send(conn, {"status": status})
    took = time.monotonic() - started
    ran = " ".join(request["argv"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"ran {ran} in {request['cwd']}: exit {status}, {took:.1f} s, peak RSS {peak:.0f} MiB",
        flush=True,
    )
    forget_models()
    return status


def run_main(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """``main(argv)`` with a process's outcome: SystemExit's code, a traceback and 1."""
    try:
        return main(argv)
    except SystemExit as error:
        code = error.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


def forget_models() -> None:
    """Keras' graphs and names of this stage, so the next one starts as in a new process."""
    import gc

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    gc.collect()
