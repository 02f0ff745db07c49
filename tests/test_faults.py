"""One test per fault a user meets, injected into real processes (CPU, synthetic, tiny).

The README's "When things go wrong" table points at these tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import copy_repo, set_params
from tasks.training.checkpoint import CHECKPOINTS
from tasks.workspace import Workspace
from tests.helpers.project import TINY, module_command, pipeline_env, read_mlflow

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# Three epochs of ~2 s each: time to see the first checkpoint and kill before the last.
KILLABLE = TINY | {"data.synthetic.train_size": 3000, "train.epochs": 3}


def run(root: Path, *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=root, env=pipeline_env(), capture_output=True, text=True, timeout=timeout
    )


def checkpointed_epochs(root: Path) -> int:
    found = list((root / CHECKPOINTS).glob("train-*/backup-*/training_metadata.json"))
    return json.loads(found[0].read_text())["epoch"] if found else 0


def kill_after_first_checkpoint(root: Path, *command: str) -> None:
    """Start ``command`` in its own process group; SIGKILL the group once epoch 1 is saved."""
    process = subprocess.Popen(
        command,
        cwd=root,
        env=pipeline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while checkpointed_epochs(root) < 1:
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def model_weights(path: Path) -> list[np.ndarray]:
    import keras

    return keras.models.load_model(path, compile=False).get_weights()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """`dvc repro` killed (-9) in the train stage after epoch 1, then `dvc repro` again."""
    root = copy_repo(tmp_path_factory.mktemp("repo"))
    set_params(root, KILLABLE)
    kill_after_first_checkpoint(root, str(BIN / "dvc"), "repro")
    killed_at = checkpointed_epochs(root)
    rerun = run(root, str(BIN / "dvc"), "repro")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    return root, killed_at, rerun.stdout + rerun.stderr


def test_a_killed_training_resumes_from_its_checkpoint(killed_and_resumed):
    root, killed_at, output = killed_and_resumed
    assert 1 <= killed_at < KILLABLE["train.epochs"]
    assert f"resuming from epoch {killed_at + 1} of 3" in output
    assert "Running stage 'data'" not in output, "finished stages are not rerun"
    assert not (root / CHECKPOINTS).exists() or not any((root / CHECKPOINTS).iterdir()), (
        "the checkpoint is removed once the model is written"
    )


def test_the_resumed_attempt_continues_one_mlflow_run_without_duplicate_steps(
    killed_and_resumed,
):
    root, _, _ = killed_and_resumed
    store = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client, runs = read_mlflow(store, "synthetic")
    registered = [run for run in runs if run.data.tags.get("pipeline.stage.register") == "done"]
    [run] = registered
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == [0, 1, 2], (metric, steps)
    assert run.data.tags["pipeline.stage.train"] == "done"
    assert all(other.info.status != "RUNNING" for other in runs)


def test_the_resumed_run_equals_an_uninterrupted_one(killed_and_resumed, tmp_path):
    root, _, _ = killed_and_resumed
    ws = Workspace(root)
    resumed_weights = model_weights(ws.model_file)
    resumed_history = ws.history.read_text()
    # The same stage from scratch, on the same data and params, without interruption.
    fresh = run(root, str(BIN / "dvc"), "repro", "--force", "--single-item", "train")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stdout + fresh.stderr
    for resumed, uninterrupted in zip(resumed_weights, model_weights(ws.model_file), strict=True):
        np.testing.assert_array_equal(resumed, uninterrupted)
    assert ws.history.read_text() == resumed_history
    assert len(resumed_history.strip().splitlines()) == 1 + KILLABLE["train.epochs"]


# One signal per entry point (test time): both install the same two handlers (SIGTERM
# raises like Ctrl-C; SIGINT restored when a script started them with it ignored).
@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_stop_signal_ends_the_stage_quickly_and_the_run_killed(tmp_path, signum):
    root = copy_repo(tmp_path)
    set_params(root, KILLABLE)
    upstream = run(root, str(BIN / "dvc"), "repro", "preprocess")
    assert upstream.returncode == 0, upstream.stderr[-3000:]
    process = subprocess.Popen(
        module_command("flows.stage", "train"),
        cwd=root,
        env=pipeline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # As a background job of a script: SIGINT ignored on entry.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    while checkpointed_epochs(root) < 1:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    sent = time.monotonic()
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0]
    assert time.monotonic() - sent < 10, "stopped within 10 s"
    assert process.returncode == 130, output[-3000:]
    name = signal.Signals(signum).name
    assert f"stage 'train' stopped by {name}" in output
    assert "Traceback" not in output
    client, runs = read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", "synthetic")
    [killed] = runs
    assert killed.info.status == "KILLED"
    assert name in killed.data.tags["pipeline.end_reason"]
    # The next attempt resumes training and records every epoch once.
    rerun = run(root, *module_command("flows.stage", "train"))
    assert rerun.returncode == 0 and "resuming from epoch" in rerun.stdout, rerun.stderr[-3000:]
    client, runs = read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", "synthetic")
    resumed = runs[0]
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(steps) == [0, 1, 2]


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    from tasks.workspace import atomic_path, write_json

    target = tmp_path / "reports" / "history.csv"
    target.parent.mkdir()
    stale = target.parent / ".history.csv.k1ll3d.csv"  # as atomic_path names its temp files
    stale.write_text("epoch,loss\n0,")
    other = target.parent / ".metrics.json.abc.json"  # another output's: not ours to touch
    other.write_text("{")
    with atomic_path(target) as tmp:
        tmp.write_text("epoch,loss\n0,1.0\n")
    assert target.read_text().endswith("1.0\n")
    assert not stale.exists() and other.exists()
    write_json(target.parent / "metrics.json", {})
    assert not other.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["history.csv", "metrics.json"]


def test_a_stale_staging_directory_of_the_data_stage_is_removed(tmp_path):
    from tasks.config import load_config
    from tasks.stages import data as data_stage
    from tests.helpers.project import PARAMS, tiny_overrides

    cfg = load_config(PARAMS, tiny_overrides(tmp_path))
    ws = Workspace(tmp_path)
    stale = ws.prepared.parent / ".prepared.tmp-k1ll3d"
    stale.mkdir(parents=True)
    (stale / "train.npz").write_bytes(b"half")
    data_stage.run(cfg, ws)
    assert not stale.exists()
    assert sorted(p.name for p in ws.prepared.parent.iterdir()) == ["prepared"]
    assert (ws.prepared.stat().st_mode & 0o777) == 0o777 & ~current_umask()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_two_first_runs_on_a_new_sqlite_store_both_succeed(tmp_path):
    """MLflow creates a new store's schema on first use; two at once used to collide."""
    store = tmp_path / "mlruns" / "mlflow.db"
    script = (
        "import sys; from pathlib import Path\n"
        "from tasks.tracking import runs\n"
        "from tasks.config import load_config\n"
        "from tasks.workspace import Workspace\n"
        "from tests.helpers.project import PARAMS, tiny_overrides\n"
        "root = Path(sys.argv[1])\n"
        "cfg = load_config(PARAMS, tiny_overrides(root.parent))\n"
        "print(runs.start_pipeline_run(cfg, Workspace(root)))\n"
    )
    env = pipeline_env() | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launched = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"run-{i}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [process.communicate(timeout=300) for process in launched]
    for process, (_, err) in zip(launched, results, strict=True):
        assert process.returncode == 0, err[-3000:]
    client, runs = read_mlflow(f"sqlite:///{store}", "synthetic")
    assert len(runs) == 2


@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_a_stopped_flow_leaves_no_process_and_no_open_run(tmp_path, signum):
    """`python -m flows.pipeline` as a background job (SIGINT ignored on entry), stopped
    mid-training: it exits within 10 s, its temporary Prefect server with it."""
    import psutil

    from tests.helpers.project import PARAMS, tiny_overrides

    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    overrides = tiny_overrides(tmp_path) | KILLABLE
    process = subprocess.Popen(
        [
            *module_command("flows.pipeline", "--workdir", "."),
            *(f"{k}={v}" for k, v in overrides.items()),
        ],
        cwd=tmp_path,
        env=pipeline_env() | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    while checkpointed_epochs(tmp_path) < 1:
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.05)
    family = psutil.Process(process.pid).children(recursive=True)
    assert family, "the flow runs a temporary Prefect server"
    sent = time.monotonic()
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0]
    assert time.monotonic() - sent < 10, output[-3000:]
    assert process.returncode == 130, output[-3000:]
    assert f"pipeline stopped by {signal.Signals(signum).name}" in output
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    _, runs = read_mlflow(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "synthetic")
    [run] = runs
    assert run.info.status == "KILLED"
    assert signal.Signals(signum).name in run.data.tags["pipeline.end_reason"]


def tiny_project(root: Path, **extra) -> Path:
    """A project directory holding params.yaml shrunk to tiny synthetic data."""
    from tests.helpers.project import PARAMS, tiny_overrides

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(PARAMS.read_text())
    set_params(root, tiny_overrides(root) | KILLABLE | extra)
    return root


def stage(root: Path, name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        module_command("flows.stage", name),
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error in stage")]


def with_repo(env: dict[str, str]) -> dict[str, str]:
    return env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.mark.parametrize("scheme", ["http", "postgresql"])
def test_a_dead_tracking_server_at_start_fails_in_bounded_time(tmp_path, scheme):
    from tasks.tracking.store import TIMEOUT_ENV
    from tests.helpers.operate import free_port

    root = tiny_project(tmp_path / "project")
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    shown = url
    if scheme == "postgresql":  # the tracking database itself; its password never shown
        url = f"postgresql://pipeline:hunter2@127.0.0.1:{port}/pipeline_mlflow"
        shown = f"postgresql://pipeline:***@127.0.0.1:{port}/pipeline_mlflow"
    env = with_repo(pipeline_env() | {"MLFLOW_TRACKING_URI": url, TIMEOUT_ENV: "5"})
    started = time.monotonic()
    done = stage(root, "data", env)
    assert time.monotonic() - started < 30
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    [line] = error_lines(done.stderr)
    assert shown in line and "did not answer for 5 s" in line
    assert "hunter2" not in done.stdout + done.stderr


@pytest.fixture
def tracking_server(tmp_path):
    """A real `mlflow server` on a free loopback port; yields (url, stop, start)."""
    from tests.helpers.operate import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1"]
    command += ["--artifacts-destination", str(tmp_path / "server-artifacts")]
    processes: list[subprocess.Popen] = []

    def start() -> None:
        env = pipeline_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        processes.append(
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        from tasks.tracking.store import wait_for_server

        wait_for_server(url, 120)

    def stop() -> None:
        os.killpg(processes[-1].pid, signal.SIGKILL)
        processes[-1].wait()

    start()
    try:
        yield url, stop, start
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_a_tracking_server_lost_mid_training_ends_the_stage_in_bounded_time(
    tmp_path, tracking_server
):
    """Training goes on without the server; the model and history are written; the stage
    then fails in bounded time naming the server; once it is back, the rerun logs the
    epochs it missed from the checkpoint."""
    from tasks.tracking.store import TIMEOUT_ENV

    url, stop_server, start_server = tracking_server
    root = tiny_project(tmp_path / "project")
    env = with_repo(pipeline_env() | {"MLFLOW_TRACKING_URI": url, TIMEOUT_ENV: "10"})
    # MLflow retries each call to the dead server back to back here (no backoff: 0 + 4 + 8
    # s apart plus jitter by default) so that the wait is the pipeline's own bound (flush
    # gives up after PIPELINE_TRACKING_TIMEOUT_S); the cap on the retries' number is
    # tests/test_tracking.py's.
    env |= {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
    for name in ("data", "preprocess"):
        done = stage(root, name, env)
        assert done.returncode == 0, done.stderr[-3000:]
    training = subprocess.Popen(
        module_command("flows.stage", "train"),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while checkpointed_epochs(root) < 1:
        assert training.poll() is None, training.communicate()[1][-3000:]
        time.sleep(0.05)
    stop_server()
    lost = time.monotonic()
    _, stderr = training.communicate(timeout=600)
    assert time.monotonic() - lost < 180, "bounded"
    assert training.returncode == 2, stderr[-3000:]
    [line] = error_lines(stderr)
    assert url in line and "model and history are written" in line
    ws = Workspace(root)
    assert ws.model_file.is_file()
    assert len(ws.history.read_text().strip().splitlines()) == 1 + KILLABLE["train.epochs"]

    start_server()
    rerun = stage(root, "train", env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    [run] = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [0, 1, 2], "every epoch's metrics exactly once"
    assert run.info.status == "FINISHED", "the rerun closed the run the lost server left open"


def test_a_tracking_server_restarted_mid_training_loses_and_duplicates_nothing(
    tmp_path, tracking_server
):
    """The server goes away after the first epoch and comes back while training goes on:
    the epochs it missed wait in memory and reach it; the stage succeeds."""
    url, stop_server, start_server = tracking_server
    root = tiny_project(tmp_path / "project")
    env = with_repo(pipeline_env() | {"MLFLOW_TRACKING_URI": url})
    for name in ("data", "preprocess"):
        assert stage(root, name, env).returncode == 0
    training = subprocess.Popen(
        module_command("flows.stage", "train"),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while checkpointed_epochs(root) < 1:
        assert training.poll() is None, training.communicate()[1][-3000:]
        time.sleep(0.05)
    stop_server()
    start_server()  # a new server process on the same port and store
    _, stderr = training.communicate(timeout=600)
    assert training.returncode == 0, stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    [run] = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    for key in ("loss", "val_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [0, 1, 2], f"{key}: every epoch's metrics exactly once"
