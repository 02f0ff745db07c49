"""The warm stage host under `dvc repro` (flows/stagehost.py), on tiny synthetic runs.

Every other `dvc repro` in the suite goes through it too (faults, reruns, remotes, the
README); these tests pin what it promises on its own: the stages after the first run in
one host and answer as their own processes would (same outputs, output lines, statuses),
a stop signal reaches the stage, a killed stage process takes its stage down, and a host
serves only the code it loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.common import copy_repo, set_params
from tasks.training.checkpoint import CHECKPOINTS
from tests.helpers.project import TINY, module_command, pipeline_env, read_mlflow

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
THREE_EPOCHS = TINY | {"data.synthetic.train_size": 3000, "train.epochs": 3}


def host_of(root: Path) -> tuple[Path, psutil.Process | None]:
    """The socket a host for ``root``'s code serves on (as a stage process there computes
    it), and that host's process if alive."""
    code = "import os; from flows import stagehost as h; "
    code += "print(h.socket_path(h.host_key(dict(os.environ))))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=pipeline_env(),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    path = Path(done.stdout.strip())
    for process in psutil.process_iter(["cmdline"]):
        if str(path) in (process.info["cmdline"] or []):
            return path, process
    return path, None


def served_stages(path: Path) -> list[str]:
    """The stages the host's log says it ran ("ran train in /dir: exit 0, 1.2 s")."""
    log = path.with_suffix(".log")
    lines = log.read_text().splitlines() if log.is_file() else []
    return [line.split()[1] for line in lines if line.startswith("ran ")]


def dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=root, env=env or pipeline_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_dvc_repro_runs_the_stages_after_the_first_in_one_host_with_the_same_results(
    tmp_path,
):
    hosted, alone = copy_repo(tmp_path / "hosted"), copy_repo(tmp_path / "alone")
    for root in (hosted, alone):
        set_params(root, TINY)
    done = dvc(hosted, "repro", "register")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path, host = host_of(hosted)
    assert served_stages(path) == ["preprocess", "train", "evaluate", "register"]
    # What each stage printed reached dvc's output, as from its own process.
    assert "training on 1 replica(s)" in done.stdout + done.stderr
    assert "Created version '1'" in done.stdout + done.stderr

    # One process per stage: the same test metrics (deterministic training) and run.
    by_itself = dvc(alone, "repro", "register", env=pipeline_env() | {"PIPELINE_STAGE_HOST": "0"})
    assert by_itself.returncode == 0, by_itself.stderr[-3000:]
    assert served_stages(host_of(alone)[0]) == []
    tested = [json.loads((root / "reports" / "metrics.json").read_text())["test"]
              for root in (hosted, alone)]  # fmt: skip
    assert tested[0] == tested[1]
    runs = [read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", "synthetic")[1]
            for root in (hosted, alone)]  # fmt: skip
    assert [run.info.status for run in runs[0]] == ["FINISHED"] == [r.info.status for r in runs[1]]
    tested = [{k: v for k, v in r[0].data.metrics.items() if k.startswith("test")} for r in runs]
    assert tested[0] and tested[0] == tested[1]

    # Nothing to do: no stage runs; an edited param reruns from train, in a host again.
    assert "didn't change" in dvc(hosted, "repro", "register").stdout
    set_params(hosted, {"train.epochs": 2})
    done = dvc(hosted, "repro", "register")
    assert done.returncode == 0, done.stderr[-3000:]
    assert served_stages(path)[-2:] == ["evaluate", "register"]
    if host is not None:
        host.wait(timeout=60)  # idle: it leaves on its own


def wait_for_line(path: Path, line: str, count: int, process: subprocess.Popen) -> None:
    """Until the host's log has ``count`` lines starting with ``line``."""
    log = path.with_suffix(".log")
    deadline = time.monotonic() + 120
    while sum(x.startswith(line) for x in log.read_text().splitlines()) < count:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_a_stop_signal_reaches_the_stage_and_a_killed_stage_process_takes_its_stage_down(
    tmp_path,
):
    root = copy_repo(tmp_path / "repo")
    set_params(root, THREE_EPOCHS)
    under_dvc = pipeline_env() | {"DVC_STAGE": "train"}
    assert dvc(root, "repro", "preprocess").returncode == 0
    path, host = host_of(root)
    assert host is not None, "the first stage started a host"

    def train_until_checkpoint(hosted: int) -> subprocess.Popen:
        shutil.rmtree(root / CHECKPOINTS, ignore_errors=True)
        output = (tmp_path / f"train-{hosted}.log").open("w")
        process = subprocess.Popen(
            module_command("flows.stage", "train"), cwd=root, env=under_dvc,
            stdout=output, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        wait_for_line(path, "running train", hosted, process)  # in the host, not by itself
        deadline = time.monotonic() + 300
        while not list((root / CHECKPOINTS).glob("train-*/backup-*/training_metadata.json")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        return process

    # SIGTERM to the stage process: the stage in the host stops as it would by itself.
    stage = train_until_checkpoint(1)
    stage.send_signal(signal.SIGTERM)
    stage.wait(timeout=60)
    output = (tmp_path / "train-1.log").read_text()
    assert stage.returncode == 130, output[-3000:]
    assert "stage 'train' stopped by SIGTERM" in output
    assert served_stages(path)[-1] == "train"
    host.wait(timeout=30)  # a stopped stage: the host leaves, the next stage gets a fresh one
    _, runs = read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", "synthetic")
    assert runs[0].info.status == "KILLED"

    # SIGKILL of the stage process: its stage (in a new host) ends with it at once.
    assert dvc(root, "repro", "preprocess", "--force").returncode == 0  # starts a new host
    _, host = host_of(root)
    assert host is not None
    stage = train_until_checkpoint(2)
    stage.kill()
    host.wait(timeout=10)  # not the 15 s an idle host waits: the stage ended with its process


def test_a_host_serves_only_the_code_and_environment_it_loaded(tmp_path, monkeypatch):
    from flows import stagehost

    for name in ("flows/stage.py", "tasks/stages/train.py"):  # a project's code, not ours
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("# code\n")
    monkeypatch.setattr(stagehost, "REPO", tmp_path)
    env = {"DVC_STAGE": "train", "PATH": "/usr/bin"}
    key = stagehost.host_key(env)
    assert stagehost.host_key(env | {"DVC_STAGE": "evaluate", "DVC_ROOT": "/x"}) == key
    assert stagehost.host_key(env | {"CUDA_VISIBLE_DEVICES": "1"}) != key
    assert stagehost.host_key(env | {"OMP_NUM_THREADS": "1"}) != key
    source = tmp_path / "tasks" / "stages" / "train.py"
    source.write_text("# edited\n")
    assert stagehost.host_key(env) != key

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  distribute: multi_worker\n")
    on = env | {"PIPELINE_STAGE_HOST": "1"}
    assert not stagehost.wanted(["train", "--params", str(params)], on)
    params.write_text("train:\n  distribute: mirrored\n")
    assert stagehost.wanted(["train", "--params", str(params)], on)
    assert not stagehost.wanted(["train", "--params", str(params)], {})  # not under DVC
    assert not stagehost.wanted(["train", "--params", str(params)], on | {"TF_CONFIG": "{}"})
    off = env | {"PIPELINE_STAGE_HOST": "0"}
    assert not stagehost.wanted(["train", "--params", str(params)], off)


def test_the_socket_folder_must_be_this_users_alone(monkeypatch):
    import tempfile

    from flows import stagehost

    tmp_path = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))  # short: a socket's path is
    monkeypatch.setattr(stagehost.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = tmp_path / f"gpu-train-pipeline-stagehost-{os.getuid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder.symlink_to(elsewhere)  # planted: refused, not followed
    with pytest.raises(PermissionError, match="not a directory of this user's alone"):
        stagehost.socket_path("k" * 8)
    folder.unlink()
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    with pytest.raises(PermissionError):
        stagehost.socket_path("k" * 8)
    folder.chmod(0o700)
    assert stagehost.socket_path("k" * 24) == folder / f"{'k' * 24}.sock"
    shutil.rmtree(tmp_path)
