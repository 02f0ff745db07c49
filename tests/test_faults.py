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
from tasks.checkpoint import CHECKPOINTS
from tasks.workspace import Workspace
from tests.conftest import TINY, read_mlflow

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# Three epochs of ~2 s each: time to see the first checkpoint and kill before the last.
KILLABLE = TINY | {"data.synthetic.train_size": 3000, "train.epochs": 3}


def project_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    return env | {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PYTHONUNBUFFERED": "1"}


def run(root: Path, *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=root, env=project_env(), capture_output=True, text=True, timeout=timeout
    )


def checkpointed_epochs(root: Path) -> int:
    found = list((root / CHECKPOINTS).glob("train-*/backup/training_metadata.json"))
    return json.loads(found[0].read_text())["epoch"] if found else 0


def kill_after_first_checkpoint(root: Path, *command: str) -> None:
    """Start ``command`` in its own process group; SIGKILL the group once epoch 1 is saved."""
    process = subprocess.Popen(
        command,
        cwd=root,
        env=project_env(),
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
    client, runs = read_mlflow(store, "cifar10-pipeline")
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_stage_quickly_and_the_run_killed(tmp_path, signum):
    root = copy_repo(tmp_path)
    set_params(root, KILLABLE)
    upstream = run(root, str(BIN / "dvc"), "repro", "preprocess")
    assert upstream.returncode == 0, upstream.stderr[-3000:]
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.stage", "train"],
        cwd=root,
        env=project_env(),
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
    client, runs = read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", "cifar10-pipeline")
    [killed] = runs
    assert killed.info.status == "KILLED"
    assert name in killed.data.tags["pipeline.end_reason"]
    # The next attempt resumes training and records every epoch once.
    rerun = run(root, sys.executable, "-m", "flows.stage", "train")
    assert rerun.returncode == 0 and "resuming from epoch" in rerun.stdout, rerun.stderr[-3000:]
    client, runs = read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", "cifar10-pipeline")
    resumed = runs[0]
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(steps) == [0, 1, 2]
