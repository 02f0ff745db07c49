"""Training on several devices and workers (tasks/training/: distribute.py, workers.py).

Mirrored on two logical CPU devices against one device, step for step; multi_worker
with two local worker processes under `dvc repro` (one MLflow run, one registered
version), a worker killed mid-run (every worker stopped, a message naming it, the rerun
resumes from the checkpoint), a killed mirrored run resuming; and the sharding rule that
every training example is seen once per epoch across replicas. Mirrored and multi_worker
under the Prefect flow with uneven replica batches (Keras' own eager reduce of a first
batch fails on those) are the README's distributed-training block, whose shrink trains
on 1191 examples; multi_worker across two hosts is tests/test_network_hosts.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from benchmarks.common import copy_repo, set_params
from tasks.config import load_config
from tasks.errors import DistributeError
from tasks.training import distribute, recipe
from tests.helpers.project import PARAMS, TINY, module_command, pipeline_env, read_mlflow

EXPERIMENT = "synthetic"


# ------------------------------------------------------------------ sharding rules


@pytest.mark.parametrize(
    ("examples", "batch", "replicas"),
    [(1200, 64, 1), (1200, 64, 2), (1000, 64, 3), (384, 64, 2), (131, 8, 4), (9, 4, 2)],
)
def test_every_example_falls_in_exactly_one_chunk_of_one_replica(examples, batch, replicas):
    bounds = distribute.chunk_bounds(examples, batch, replicas)
    steps = distribute.steps_per_epoch(examples, batch, replicas)
    taken = []
    for replica in range(replicas):
        ids = distribute.Shard(replica, 1, replicas).chunk_ids(steps)
        assert len(ids) == steps, "replicas must agree on the number of steps"
        sizes = bounds[ids + 1] - bounds[ids]
        assert sizes.min() >= 1 and sizes.max() <= batch
        taken += [np.arange(bounds[i], bounds[i + 1]) for i in ids]
    assert np.array_equal(np.sort(np.concatenate(taken)), np.arange(examples))


def test_replicas_see_each_shuffled_index_once_and_together_the_one_device_batches():
    import tensorflow as tf

    from tasks.images.augment import index_batches

    examples, batch, seed = 384, 64, 7
    epoch = tf.Variable(3, dtype=tf.int64)

    def passes(shard: distribute.Shard, per_replica: int) -> list[np.ndarray]:
        dataset = index_batches(examples, per_replica, seed, epoch, shard)
        return list(dataset.as_numpy_iterator())

    single = passes(distribute.Shard(), 2 * batch)
    halves = [passes(distribute.Shard(r, 1, 2), batch) for r in range(2)]
    seen = np.concatenate([np.concatenate(h) for h in halves])
    assert np.array_equal(np.sort(seen), np.arange(examples))
    for step, whole in enumerate(single):  # the global batch divides the data: aligned
        assert np.array_equal(np.concatenate([halves[0][step], halves[1][step]]), whole)


def test_shards_get_distinct_reproducible_seeds_and_the_first_keeps_the_runs():
    seeds = [distribute.Shard(r, 1, 4).seed(42) for r in range(4)]
    assert seeds[0] == 42 and len(set(seeds)) == 4
    assert seeds == [distribute.Shard(r, 1, 4).seed(42) for r in range(4)]


def test_tf_config_names_the_chief_and_a_bad_one_names_the_fix(monkeypatch):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for index, chief in ((0, True), (1, False)):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
        assert distribute.is_chief() is chief and distribute.worker_index() == index
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(DistributeError, match="TF_CONFIG is not valid.*task"):
        distribute.is_chief()
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.is_chief() and distribute.worker_index() == 0


# What TensorFlow 2.21 raised in worker 0 (this machine, two `flows.stage train` workers
# with TF_CONFIG): worker 1 killed (SIGKILL), then worker 1 stopped (SIGSTOP).
RESET = (
    "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
    "information from remote target /job:worker/replica:0/task:1 while calling "
    "/tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error received from peer  "
    '{grpc_message:"recvmsg:Connection reset by peer", grpc_status:14}'
)
HEARTBEATS = (
    "Collective ops is aborted by: Error reported from /job:worker/task:1: The following "
    "tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe "
    "tasks have crashed. Check the task logs for an earlier error"
)


def test_a_lost_worker_is_named_with_its_address_in_one_line(monkeypatch):
    import tensorflow as tf

    cluster = {"worker": ["10.0.0.2:2222", "10.0.0.3:2222"]}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"index": 0, "type": "worker"}})
    )
    for text, cause in (
        (RESET, "closed its connection"),
        (HEARTBEATS, "stopped sending heartbeats"),
    ):
        line = distribute.peer_failure(tf.errors.UnavailableError(None, None, text))
        assert line.startswith("worker 1 at 10.0.0.3:2222 (/job:worker/task:1) " + cause), line
        assert "this worker (0 at 10.0.0.2:2222)" in line and "\n" not in line, line
    # Worker 1 names worker 0 when the chief is the one gone.
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"index": 1, "type": "worker"}})
    )
    gone = RESET.replace("task:1", "task:0")
    assert distribute.peer_failure(tf.errors.AbortedError(None, None, gone)).startswith(
        "worker 0 at 10.0.0.2:2222"
    )
    # Anything else keeps its traceback: not an op error, or no other task named.
    assert distribute.peer_failure(ValueError(RESET)) is None
    assert distribute.peer_failure(tf.errors.InternalError(None, None, "out of memory")) is None
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.peer_failure(tf.errors.UnavailableError(None, None, RESET)) is None


def test_linear_scaling_warms_up_to_replicas_times_the_rate():
    cfg = load_config(PARAMS, {"train.lr_scaling": "linear", "train.learning_rate": 0.01})
    train = cfg.train.model_copy(update={"epochs": 10})
    assert recipe.learning_rate(train, 100, replicas=1) == 0.01  # one replica: unchanged
    schedule = recipe.learning_rate(train, 100, replicas=4)
    rates = [float(schedule(step)) for step in (0, 50, 100, 999)]
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.02)  # warming up (10% of 1000)
    assert rates[2] == pytest.approx(0.04) and rates[3] == pytest.approx(0.04)  # then held


def test_multi_worker_here_needs_two_workers_before_starting_any(tmp_path):
    from tasks.training import workers
    from tasks.workspace import Workspace

    cfg = load_config(PARAMS, {"train.distribute": "multi_worker", "train.workers": 1})
    with pytest.raises(DistributeError, match="train.workers is 1.*at least 2"):
        workers.run_local_workers(cfg, Workspace(tmp_path))
    assert not (tmp_path / ".pipeline").exists()


def test_xla_with_mirrored_logical_cpus_is_refused_before_tensorflow_starts():
    cfg = load_config(PARAMS, {"train.distribute": "mirrored", "train.xla": True})
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("with GPUs, mirrored runs on them and XLA is allowed")
    with pytest.raises(DistributeError, match="train.xla true cannot run mirrored.*auto or false"):
        distribute.for_config(cfg.train)


# ------------------------------------------------------------------ mirrored = one device


def test_mirrored_on_two_cpu_devices_matches_one_device_step_for_step(tmp_path):
    """Same seed, data and global batch (128 = 2 x 64 vs 1 x 128), augmentation off,
    plain SGD: the first loss and the weights after 3 steps agree. oneDNN is off in both
    processes: its convolutions sum in an order that depends on the batch size (with it
    on, weights differ by up to 8e-6 after 3 steps, also between batch sizes alone)."""
    results = {}
    for mode in ("none", "mirrored"):
        out = tmp_path / f"{mode}.npz"
        subprocess.run(
            module_command("tests.helpers.distributed_steps", mode, str(out)),
            env=pipeline_env() | {"TF_ENABLE_ONEDNN_OPTS": "0"},
            cwd=Path(__file__).resolve().parents[1],
            check=True,
            capture_output=True,
            timeout=300,
        )
        results[mode] = np.load(out)
    one, two = results["none"], results["mirrored"]
    assert int(one["replicas"]) == 1 and int(two["replicas"]) == 2
    assert int(one["steps"]) == int(two["steps"]) == 3
    assert float(two["first_loss"]) == pytest.approx(float(one["first_loss"]), rel=1e-6)
    weights = [key for key in one.files if key.startswith("w")]
    for key in weights:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)


# ------------------------------------------------------------------ multi_worker, end to end


def run(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args), cwd=root, env=pipeline_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """`dvc repro` of a tiny project whose train stage runs as two local workers."""
    root = copy_repo(tmp_path_factory.mktemp("workers"))
    params = {"train.distribute": "multi_worker", "train.workers": 2, "train.epochs": 2}
    set_params(root, TINY | params)
    return root, run(root, "dvc", "repro").stdout


def store(root: Path):
    return read_mlflow(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", EXPERIMENT)


@pytest.mark.slow
def test_two_workers_under_dvc_repro_make_one_run_and_one_version(two_workers):
    root, output = two_workers
    assert "starting 2 local workers" in output
    assert (
        "training on 2 replica(s) (multi_worker: 2 workers x 1 device(s)); global batch 128"
        in output
    )
    client, runs = store(root)
    [run_] = runs  # the chief tracks; the other worker never opens a run
    assert run_.data.params["train.replicas_in_sync"] == "2"
    assert run_.data.params["train.global_batch_size"] == "128"
    for metric in ("loss", "val_accuracy"):
        history = client.get_metric_history(run_.info.run_id, metric)
        assert [m.step for m in history] == [0, 1], metric  # once per epoch, not per worker
    [version] = client.search_model_versions("name='synthetic-seed_cnn'")
    assert version.run_id == run_.info.run_id
    worker_log = (root / ".pipeline" / "workers" / "worker-1.log").read_text()
    assert "worker 1: training on 2 replica(s)" in worker_log
    assert not list((root / ".pipeline" / "checkpoints").glob("*")), "every worker cleans up"


def train_until_checkpoint(root: Path, folder: str, output: int) -> subprocess.Popen:
    """`python -m flows.stage train`, returned once a checkpoint folder matching
    ``folder`` holds its first epoch."""
    stage = subprocess.Popen(
        module_command("flows.stage", "train"),
        cwd=root,
        env=pipeline_env(),
        stdout=output,
        stderr=output,
        text=True,
    )
    checkpoints = root / ".pipeline" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob(f"{folder}/backup-*/training_metadata.json")):
        assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()
        time.sleep(0.2)
    return stage


def assert_three_epochs_logged_once(root: Path):
    """The newest run has each of 3 epochs' loss once, across the killed and resumed
    attempts; returns that run."""
    client, runs = store(root)
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2], "each epoch once, across the two attempts"
    return runs[0]


@pytest.mark.slow
def test_a_killed_worker_stops_all_and_the_rerun_resumes(two_workers):
    root, _ = two_workers
    set_params(root, {"train.epochs": 3})
    launcher = train_until_checkpoint(root, "train-*-worker1", subprocess.PIPE)
    family = psutil.Process(launcher.pid).children(recursive=True)
    [second] = [p for p in family if '"index": 1' in p.environ().get("TF_CONFIG", "")]
    second.kill()
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2, out[-3000:] + err[-3000:]
    assert f"worker 1 (pid {second.pid}) was killed by SIGKILL" in err
    assert "all workers were stopped" in err
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"

    rerun = run(root, *module_command("flows.stage", "train"))
    assert re.search(r"resuming from epoch [23] of 3", rerun.stdout), rerun.stdout[-3000:]
    latest = assert_three_epochs_logged_once(root)
    assert latest.info.status == "FINISHED"


@pytest.mark.slow
def test_a_killed_mirrored_run_resumes_from_its_checkpoint(two_workers):
    root, _ = two_workers
    set_params(root, {"train.distribute": "mirrored", "train.epochs": 3})
    stage = train_until_checkpoint(root, "train-*", subprocess.DEVNULL)
    stage.kill()
    stage.wait(timeout=30)
    rerun = run(root, *module_command("flows.stage", "train"))
    assert "training on 2 replica(s) (mirrored" in rerun.stdout
    assert re.search(r"resuming from epoch [23] of 3", rerun.stdout), rerun.stdout[-3000:]
    assert_three_epochs_logged_once(root)
