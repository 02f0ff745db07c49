"""A tiny project for the tests: the repository's params, the small sizes every pipeline
test trains at, the environment a pipeline subprocess gets, and how tests run a stage,
an entry point or `dvc repro` in a copy of the project and read what it left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import set_params
from flows.stage import STAGE_NAMES

REPO = Path(__file__).resolve().parents[2]


PARAMS = REPO / "params.yaml"


# Small enough for seconds per stage on 2 CPU cores, big enough that training improves.
TINY = {
    "data.source": "synthetic",
    "data.synthetic.train_size": 1200,
    "data.synthetic.test_size": 300,
    "train.epochs": 1,
    "train.batch_size": 64,
    "preprocess.grid_samples": 16,
    # The SavedModel alone: every format and quantization is tested once, in test_export.py.
    "export.formats": ["saved_model"],
    "export.quantize": "none",
    "export.parity_samples": 64,
}


# Official Fashion-MNIST as IDX files (.ci/run installs Debian's dataset-fashion-mnist), and
# the overrides that shrink it for a pipeline test: three classes (3,000 test images), 40
# labels each.
FASHION = Path("/usr/share/datasets/fashion-mnist")
REAL_FASHION = {
    "data.source": "idx",
    "data.name": "fashion_mnist",
    "data.classes": [0, 1, 2],
    "data.labels_per_class": 40,
}


def call_main(main, argv: tuple[str, ...], capsys) -> tuple[int, str, str]:
    """``main(argv)`` as its `python -m` entry point runs it: (status, stdout, stderr); the
    signal handlers main installs are put back afterwards."""
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = main([str(arg) for arg in argv])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    return status, out, err


def pipeline_env() -> dict[str, str]:
    """The environment for a pipeline subprocess: the virtualenv first on PATH (dvc.yaml's
    `python -m ...`) and no MLFLOW_* setting of this process (tests use their own stores)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    bin_dir = Path(sys.executable).parent
    return env | {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONUNBUFFERED": "1"}


def tiny_overrides(root: Path) -> dict:
    store = root / "mlruns"
    return TINY | {
        "mlflow.tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
        "mlflow.artifact_root": str(store / "artifacts"),
    }


def experiment_of(root: Path) -> str:
    """The experiment a project's runs go to: its params.yaml resolved (``auto`` names it
    after the dataset)."""
    from tasks.config import load_config

    return load_config(root / "params.yaml").mlflow.experiment


def read_mlflow(tracking_uri: str, experiment: str):
    """(client, runs of the experiment, newest first) from a real MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} missing from {tracking_uri}"
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    return client, runs


def dvc_repro(root: Path, *targets: str) -> str:
    """`dvc repro` (of ``targets`` and what they depend on, when given) in ``root``."""
    env = pipeline_env()
    result = subprocess.run(
        ["dvc", "repro", *targets], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stderr + result.stdout  # DVC's own lines (stdout) last


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGE_NAMES if f"Running stage '{stage}'" in output]


STAGE_TIMEOUT_S = 300


def make_project(root: Path, **params: object) -> Path:
    """A project directory whose params.yaml is the real one, shrunk, with ``params`` set."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(PARAMS.read_text())
    set_params(root, tiny_overrides(root) | params)
    return root


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args`` with the suite's interpreter (the project's virtualenv):
    how every test starts an entry point, a server or a helper process."""
    return [sys.executable, "-m", module, *args]


def run_module(
    module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd`` to its end, its output captured as text;
    ``env`` is a pipeline subprocess's (`pipeline_env`) unless given."""
    return subprocess.run(
        module_command(module, *args),
        cwd=cwd,
        env=pipeline_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_entry_point(root: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``root`` with this checkout's code, as dvc.yaml runs it."""
    env = {
        "PATH": str(Path(sys.executable).parent),
        "PYTHONPATH": str(REPO),
        "HOME": str(root),  # ~/.keras, ~/.config and the like stay inside the project
        "PREFECT_HOME": str(root / ".prefect"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    return run_module(module, *args, cwd=root, env=env, timeout=STAGE_TIMEOUT_S)


def the_error_line(done: subprocess.CompletedProcess, prefix: str) -> str:
    """The one line starting with ``prefix``, after checking exit status 2 and no traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def run_statuses(root: Path) -> list[str]:
    """The status of every run in the project's MLflow store (none when it was never made)."""
    db = root / "mlruns" / "mlflow.db"  # tiny_overrides' store
    if not db.is_file():
        return []
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [run.info.status for run in client.search_runs(experiments)] if experiments else []
