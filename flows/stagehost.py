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
- Each host serves one pipeline pass: it leaves after the last stage (export), and takes
  no train stage once a stage that runs TensorFlow ran in it (TensorFlow's devices and op
  determinism are set once per process; such a train runs in its own process).
- Not used for multi-worker training (each worker is a process TF_CONFIG describes),
  outside DVC, or on a machine with an NVIDIA GPU unless PIPELINE_STAGE_HOST=1 (a host
  would hold GPU memory between stages and for IDLE_S after them).
  `PIPELINE_STAGE_HOST=0` runs every stage in its own process.
- Ctrl-Z stops the stage process, not the stage in the host.
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

from tasks import startup  # a leaf module: standard library only

SWITCH = "PIPELINE_STAGE_HOST"  # "0": every stage in its own process
IDLE_S = 15.0  # DVC starts the next stage within a second or two of the last
LAST_STAGE = "export"  # dvc.yaml's last: nothing runs after it
CODE_DIRS = ("flows", "tasks")
# What differs between the stages of one `dvc repro` (DVC_STAGE, ...) and a shell's own
# bookkeeping; every other variable is part of a host's key (libraries read some at load).
PER_STAGE_ENV = ("DVC_", "PWD", "OLDPWD", "SHLVL", "_")
MAX_SOCKET_PATH = 100  # bytes; Unix sockets take 108
REPO = Path(__file__).resolve().parents[1]


def wanted(argv: list[str], env: dict[str, str]) -> bool:
    """Whether this stage goes to a host: under DVC, not switched off (nor left off on a GPU
    machine), not a worker of multi-worker training (TF_CONFIG here, or train.distribute in
    the params)."""
    switch = env.get(SWITCH, "0" if startup.has_nvidia_gpu() else "1")
    if "DVC_STAGE" not in env or switch == "0" or "TF_CONFIG" in env:
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
    import sysconfig

    digest = hashlib.sha256()
    packages = Path(sysconfig.get_paths()["purelib"])  # an install or upgrade touches it
    digest.update(f"{sys.executable}\0{REPO}\0{packages.stat().st_mtime_ns}\0".encode())
    for name, value in sorted(env.items()):
        if not name.startswith(PER_STAGE_ENV):
            digest.update(f"{name}={value}\0".encode())
    umask = os.umask(0)
    os.umask(umask)
    digest.update(f"umask={umask}\0".encode())
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    return digest.hexdigest()[:24]


def socket_path(key: str) -> Path:
    """A socket in a directory only this user can enter (made so, or refused)."""
    import stat

    folder = Path(tempfile.gettempdir()) / f"gpu-train-pipeline-stagehost-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    owned = os.lstat(folder)  # a link planted in /tmp is refused, not followed
    if not stat.S_ISDIR(owned.st_mode) or owned.st_uid != os.getuid() or owned.st_mode & 0o077:
        raise PermissionError(f"{folder} is not a directory of this user's alone")
    path = folder / f"{key}.sock"
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise OSError(f"{path}: too long for a Unix socket")
    return path


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

HOST_FLAG = "--serve-stages"  # `python -m flows.stage --serve-stages SOCKET PID`: a host


def entry(argv: list[str], main: Callable[[list[str]], int]) -> int:
    """`python -m flows.stage ...`: a stage (``main``), or a host of stages."""
    if argv[:1] == [HOST_FLAG] and len(argv) == 3:
        return serve(Path(argv[1]), int(argv[2]), main)
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
        if peer_uid(conn) != os.getuid():  # our environment goes only to our own host
            conn.close()
            return None
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
            [sys.executable, "-m", "flows.stage", HOST_FLAG, str(path), str(os.getpid())],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


# ---------------------------------------------------------------------------------- the host


def serve(path: Path, first: int, main: Callable[[list[str]], int]) -> int:
    """Serve stages (``main``) on ``path`` while the stage process ``first`` (the one that
    started this host) runs and until IDLE_S pass without a stage after it."""
    import fcntl

    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 (held for the host's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another host serves this code already
    prune(path.parent)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)  # a stage that connects while the libraries load waits for them
    served: list[str] = []
    try:
        warm_up()
        listener.settimeout(1.0)
        idle_since = None
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if alive(first):
                    continue
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > IDLE_S:
                    return 0
                continue
            with conn:
                if peer_uid(conn) != os.getuid():
                    continue
                status, stage = serve_one(conn, main, served)
            idle_since = time.monotonic()
            if stage:
                served.append(stage)
            if status != 0 or stage == LAST_STAGE:
                return 0  # a failed or stopped stage, or the pass is over: a fresh process next
    finally:
        path.unlink(missing_ok=True)
        listener.close()
        lock.close()  # before the interpreter's slow teardown: a new host may start now


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's (a reused pid)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def prune(folder: Path, days: float = 1.0) -> None:
    """Logs and locks of hosts of older code, untouched for ``days``."""
    cutoff = time.time() - days * 86400
    for old in [*folder.glob("*.log"), *folder.glob("*.lock")]:
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


def warm_up() -> None:
    """What the stages load: TensorFlow (quietly), Keras, DALI, MLflow and its store."""
    startup.prepare_process()
    startup.import_tensorflow()
    import keras  # noqa: F401
    import mlflow  # noqa: F401
    import nvidia.dali  # noqa: F401
    from mlflow.store.tracking import sqlalchemy_store  # noqa: F401


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (the kernel's word)."""
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


TENSORFLOW_STAGES = ("train", "evaluate", "register", "export")


def serve_one(
    conn: socket.socket, main: Callable[[list[str]], int], served: list[str]
) -> tuple[int, str | None]:
    """Run one stage as its process would; return its exit status and the stage's name
    (None when no stage ran: a request it refused, or a stage process already gone)."""
    try:
        request, fds = receive(conn, with_fds=True)
    except (OSError, ValueError):
        return 0, None
    stage = (request or {}).get("argv", [None])[0]
    if (
        request is None
        or len(fds) != 3
        or (stage == "train" and any(done in TENSORFLOW_STAGES for done in served))
    ):
        for fd in fds:
            os.close(fd)
        return 0, None  # closed unanswered: the stage process runs it itself
    try:
        send(conn, {"pid": os.getpid()})
    except OSError:
        for fd in fds:
            os.close(fd)
        return 0, None
    print(f"running {stage} in {request['cwd']}", flush=True)
    started = time.monotonic()
    finished = threading.Event()

    def watch() -> None:  # the stage process died: so does its stage, at once
        with contextlib.suppress(OSError):
            conn.recv(1)
        if not finished.is_set():
            os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    streams = (sys.stdin, sys.stdout, sys.stderr)
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    environ, cwd, argv = dict(os.environ), os.getcwd(), sys.argv
    deterministic = op_determinism()
    for source, target in zip(fds, (0, 1, 2), strict=True):
        os.dup2(source, target)
        os.close(source)
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):  # as a process of its own would
        stream.reconfigure(line_buffering=os.isatty(fd) or fd == 2, write_through=unbuffered)
    status = 1
    try:
        os.chdir(request["cwd"])
        sys.argv = ["flows.stage", *request["argv"]]
        # The stage's own handlers (main sets the same), before any of it runs.
        signal.signal(signal.SIGTERM, startup.raise_interrupted)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        status = run_main(main, request["argv"])
    finally:
        # From here to the answer a forwarded signal must not cut the host short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        finished.set()
        with contextlib.suppress(OSError):
            send(conn, {"status": status})
        sys.stdin, sys.stdout, sys.stderr = streams
        for fd, target in zip(saved, (0, 1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=False, write_through=True)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.argv = argv
        set_op_determinism(deterministic)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    took = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ran = " ".join(request["argv"])
    print(
        f"ran {ran} in {request['cwd']}: exit {status}, {took:.1f} s, peak RSS {peak:.0f} MiB",
        flush=True,
    )
    forget_models()
    return status, stage


def op_determinism() -> bool:
    """Whether TensorFlow's op determinism is on (the train stage turns it on for the
    process; a stage of its own would start with it off)."""
    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.framework import config

    return config.is_op_determinism_enabled()


def set_op_determinism(enabled: bool) -> None:
    if "tensorflow" not in sys.modules:
        return
    from tensorflow.python.framework import config  # disable_ is not in tf.config's API

    if enabled:
        config.enable_op_determinism()
    else:
        config.disable_op_determinism()


def run_main(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """``main(argv)`` with a process's outcome: SystemExit's code (a message printed, as
    the interpreter does), 130 for an interrupt that escaped it, a traceback and 1."""
    try:
        return main(argv)
    except SystemExit as error:
        code = error.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:
        traceback.print_exc()
        return 1


def forget_models() -> None:
    """Keras' graphs and layer names of this stage, and its garbage, before the next one."""
    import gc

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    gc.collect()
