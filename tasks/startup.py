"""What an entry point sets before heavy imports: calm logs on CPU, no telemetry.

TensorFlow prints CUDA ``cuInit``/cuDNN/TensorRT error lines and banners on every start
of a machine without a GPU; those are not problems there, so on such machines its C++
log is limited to fatal messages, the banners its libraries print while loading are
dropped (any other line printed then is kept), and one line says where work runs
instead. On a GPU machine only TensorFlow's info lines are hidden, so real warnings and
errors still show.
Prefect analytics and MLflow telemetry are off by default. TensorFlow's oneDNN CPU kernels
are on by default: TensorFlow itself turns them on only on CPUs with AVX-512 VNNI/BF16 or
AMX, and on a 2-core AVX2 AMD EPYC an epoch of the fast Fashion-MNIST profile took 57-62 s
with them against 90-96 s without (BENCHMARKS.md section 5). A value the user
set in the environment always wins (e.g. ``TF_CPP_MIN_LOG_LEVEL=0``,
``MLFLOW_DISABLE_TELEMETRY=false``, ``TF_ENABLE_ONEDNN_OPTS=0``).
A leaf module: standard library only, safe to call before TensorFlow is imported.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What TensorFlow's libraries print while loading on a machine without CUDA (TF 2.21),
# before its log level applies.
LOADING_BANNERS = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
)
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"  # read once, when TensorFlow loads
NO_TELEMETRY = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # also: no DNS errors offline
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def has_nvidia_gpu() -> bool:
    """Whether the NVIDIA driver shows a GPU, without importing CUDA or TensorFlow."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def process_defaults() -> dict[str, str]:
    """The environment defaults of every pipeline process (a child process started with
    another environment gets them too: flows/reproduce/runner.py)."""
    return NO_TELEMETRY | {
        # Progress bars for millisecond downloads of local artifacts only clutter stage logs.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TF_CPP_MIN_LOG_LEVEL": "1" if has_nvidia_gpu() else "3",  # 3: fatal only
        ONEDNN_ENV: "1",
    }


def prepare_process() -> str | None:
    """Set the log level and telemetry defaults; return the one line to print on a
    CPU-only machine (None with a GPU)."""
    for key, value in process_defaults().items():
        os.environ.setdefault(key, value)
    return None if has_nvidia_gpu() else "no GPU found: TensorFlow and DALI run on the CPU"


@contextmanager
def routed_stderr_lines(consume: Callable[[str], bool]) -> Iterator[None]:
    """Collect what anything (C++ included) writes to file descriptor 2 inside the block,
    then write each line back unless ``consume(line)`` takes it (returns True)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if not consume(line):
                    print(line, file=sys.stderr)


def import_tensorflow() -> None:
    """Import TensorFlow now, without its loading banners on a machine with no GPU (call
    after prepare_process, in processes that will use TensorFlow anyway)."""
    if "tensorflow" in sys.modules or has_nvidia_gpu():
        return
    with routed_stderr_lines(lambda line: any(text in line for text in LOADING_BANNERS)):
        import tensorflow  # noqa: F401


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM) turned into the same unwinding as Ctrl-C; names the signal."""


def stop_signal(error: BaseException) -> str | None:
    """The signal's name when ``error`` is a stop (Ctrl-C, SIGTERM), else None.

    Ctrl-C is KeyboardInterrupt (ours for SIGTERM too, see raise_interrupted); inside a
    Prefect flow, Prefect turns SIGTERM into its TerminationSignal, which carries the number.
    """
    if isinstance(error, KeyboardInterrupt):
        return str(error) or "SIGINT"
    number = getattr(error, "signal", None)
    if type(error).__name__ == "TerminationSignal" and isinstance(number, int):
        return signal.Signals(number).name
    return None


def raise_interrupted(signum: int, frame: Any) -> None:
    """A signal handler: stop like Ctrl-C, so every `finally` and run-closing path runs."""
    raise Interrupted(signal.Signals(signum).name)


def exit_without_teardown(status: int) -> None:
    """End the process as the interpreter would, minus the teardown of its modules.

    After a flow run, finalizing an interpreter that loaded TensorFlow, DALI, MLflow and
    Prefect took 2.4 s on two cores (benchmarks/stages.py's flow overhead). What a normal
    exit does that matters still runs, in its order: non-daemon threads are joined and idle
    executors stopped, then the exit handlers (Prefect's temporary server stop, logging's
    and MLflow's flushes), then stdout and stderr are flushed.
    """
    import atexit
    import threading

    try:
        threading._shutdown()  # the interpreter's first step at exit (CPython)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # anything odd: leave the usual way
        sys.exit(status)
    os._exit(status)
