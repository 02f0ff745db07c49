"""Data-parallel training with tf.distribute: the one place the strategy is chosen.

``train.distribute`` picks it: ``mirrored`` (every local GPU, or ``train.replicas`` logical
CPU devices on a machine without GPUs), ``multi_worker`` (MultiWorkerMirroredStrategy;
each worker process reads its role from TF_CONFIG, see flows/workers.py for the local
launcher), ``none``, or ``auto`` (mirrored on 2+ GPUs, else none). ``train.batch_size`` is
per replica; the global batch is that times the replicas in sync.

Input: every pipeline gets a `Shard` and builds its own DALI pipeline (seed derived from
the run's seed and the shard, on the shard's device) through
`strategy.distribute_datasets_from_function`: one pipeline per replica under mirrored
(PER_REPLICA), one per worker under multi_worker. An epoch's permutation (a function of
seed and epoch, as without distribution) is cut into steps x replicas chunks and replica
r takes chunk ``k * replicas + r`` at step k, so every example is seen once per epoch and
the union of a step's chunks is the batch one device would see (when the global batch
divides the data; otherwise the chunks are balanced and differ by at most one example).

Keras 3.15's ``fit`` fails under MultiWorkerMirroredStrategy twice (keras-team/keras#20585):
an eager cross-worker reduce of the first batch before training (which also fails under
MirroredStrategy when replicas' first batches differ in size), and a reduce of scalar
metrics along axis 0. `Distribution.prepare` gives the model, under any strategy, a
train and a test function that reduce along no axis and defers its build to the first
step, so ``fit`` with its callbacks (checkpoints, CSV and MLflow loggers, EMA) stays the
one training loop for every strategy.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.config import TrainConfig
from tasks.errors import DistributeError

TF_CONFIG = "TF_CONFIG"
MODES = ("none", "mirrored", "multi_worker")


@dataclass(frozen=True)
class Shard:
    """What one input pipeline yields: at step k, chunks ``k * replicas + first + l`` for
    l < ``local`` (the replicas it feeds), on TensorFlow device ``device``."""

    first: int = 0
    local: int = 1
    replicas: int = 1
    device: str = "/cpu:0"

    def chunk_ids(self, steps: int) -> np.ndarray:
        step = np.arange(steps)[:, None] * self.replicas
        return (step + self.first + np.arange(self.local)[None, :]).reshape(-1)

    @property
    def dali_device_id(self) -> int | None:
        """The GPU index DALI runs on, None on a CPU device (DALI needs None there)."""
        if "GPU" not in self.device.upper():
            return None
        return int(self.device.rsplit(":", 1)[1])

    def seed(self, run_seed: int) -> int:
        """The run's seed for the first shard (single-device runs are unchanged); a
        distinct, reproducible seed for every other one."""
        if self.first == 0:
            return run_seed
        return int(np.random.SeedSequence([run_seed, self.first]).generate_state(1)[0] >> 1)


def steps_per_epoch(examples: int, batch_size: int, replicas: int = 1) -> int:
    return math.ceil(examples / (batch_size * replicas))


def chunk_bounds(examples: int, batch_size: int, replicas: int = 1) -> np.ndarray:
    """Boundaries of the steps x replicas chunks an epoch's permutation is cut into.

    One replica: batches of ``batch_size``, the last one partial (as ``Dataset.batch``).
    Several: aligned to global batches when the global batch divides the data, else
    balanced (sizes differ by at most one, none is empty and none exceeds batch_size).
    """
    steps = steps_per_epoch(examples, batch_size, replicas)
    chunks = steps * replicas
    if replicas > 1 and examples < chunks:
        raise DistributeError(
            f"{examples} examples cannot fill {replicas} replicas: lower train.batch_size "
            "or train.replicas/train.workers, or use more data"
        )
    if replicas == 1 or examples % (batch_size * replicas) == 0:
        return np.minimum(np.arange(chunks + 1) * batch_size, examples)
    return (np.arange(chunks + 1) * examples) // chunks


def cluster() -> dict[str, Any] | None:
    """TF_CONFIG as a dict, or None when this process is not a worker of a cluster."""
    raw = os.environ.get(TF_CONFIG)
    if not raw:
        return None
    try:
        config = json.loads(raw)
        task = config["task"]
        return {"cluster": config["cluster"], "type": task["type"], "index": int(task["index"])}
    except (ValueError, KeyError, TypeError) as error:
        raise DistributeError(
            f"TF_CONFIG is not valid ({error}): it must be JSON like "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}'
        ) from None


# A task of the cluster, as TensorFlow names it in errors ("/job:worker/replica:0/task:1").
_TASK = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")
# What the collective layer says when a peer is gone, most specific first.
_PEER_CAUSES = (
    (
        "stopped sending heartbeats",
        "stopped sending heartbeats (its process ended or hangs, or its host is unreachable)",
    ),
    ("connection reset by peer", "closed its connection (its process ended)"),
    ("failed to connect", "cannot be reached"),
    ("socket closed", "closed its connection (its process ended)"),
    ("deadline exceeded", "did not answer in time"),
)


def peer_failure(error: BaseException) -> str | None:
    """The one line for a collective that failed because another worker is gone, naming
    that worker's index and address from TF_CONFIG; None for anything else (a bug keeps
    its traceback). TensorFlow reports it as an Unavailable/Aborted/Cancelled error with
    the peer's task name somewhere in a long text: the coordination service's list of
    unhealthy tasks when heartbeats stop (about 10 s), or the gRPC target whose
    connection was reset when the process ended."""
    role = cluster()
    if role is None:
        return None
    import tensorflow as tf

    if not isinstance(error, tf.errors.OpError):
        return None
    text = str(error)
    me = (role["type"], role["index"])
    unhealthy = text.partition("unhealthy")[2] or text
    peers = [(job, int(i)) for job, i in _TASK.findall(unhealthy) if (job, int(i)) != me]
    if not peers:
        return None
    job, index = peers[0]
    lowered = text.lower()
    cause = next((said for key, said in _PEER_CAUSES if key in lowered), "failed")
    return (
        f"{job} {index}{_at(role, job, index)} (/job:{job}/task:{index}) {cause}, so "
        f"training stopped on this {me[0]} ({me[1]}{_at(role, *me)}) too"
    )


def _at(role: dict[str, Any], job: str, index: int) -> str:
    """ " at <host:port>" for a task TF_CONFIG lists, else nothing."""
    addresses = role["cluster"].get(job) or []
    return f" at {addresses[index]}" if index < len(addresses) else ""


def is_chief() -> bool:
    """The process that tracks, writes the model and registers: worker 0 (or the chief)."""
    role = cluster()
    if role is None:
        return True
    has_chief = bool(role["cluster"].get("chief"))
    return role["type"] == "chief" or (
        not has_chief and role["type"] == "worker" and role["index"] == 0
    )


def worker_index() -> int:
    role = cluster()
    return 0 if role is None else role["index"]


def resolve_mode(cfg: TrainConfig) -> str:
    if cfg.distribute != "auto":
        return cfg.distribute
    import tensorflow as tf

    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"


def launches_workers(cfg: TrainConfig) -> bool:
    """multi_worker without TF_CONFIG: this process starts train.workers local workers."""
    return cfg.distribute == "multi_worker" and cluster() is None


@dataclass
class Distribution:
    mode: str
    strategy: Any = None  # None: TensorFlow's default (one device)

    @property
    def replicas_in_sync(self) -> int:
        return 1 if self.strategy is None else int(self.strategy.num_replicas_in_sync)

    @property
    def chief(self) -> bool:
        return is_chief()

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self.strategy is None else self.strategy.scope()

    def dataset(self, factory: Callable[[Shard], Any]) -> Any:
        """``factory(shard)`` builds one pipeline's dataset; distributed per replica (or
        per worker) through the strategy, one input mode per process."""
        if self.strategy is None:
            return factory(Shard())
        import tensorflow as tf

        devices = list(self.strategy.extended.worker_devices)
        replicas = self.replicas_in_sync
        per_replica = self.mode == "mirrored"

        def build(context: tf.distribute.InputContext) -> Any:
            pipeline = context.input_pipeline_id
            if per_replica:
                shard = Shard(pipeline, 1, replicas, devices[pipeline])
            else:
                shard = Shard(pipeline * len(devices), len(devices), replicas, devices[0])
            with tf.device(shard.device):
                return factory(shard)

        mode = tf.distribute.InputReplicationMode
        options = tf.distribute.InputOptions(
            experimental_replication_mode=mode.PER_REPLICA if per_replica else mode.PER_WORKER,
            experimental_place_dataset_on_device=per_replica,
            experimental_fetch_to_device=not per_replica,
        )
        return self.strategy.distribute_datasets_from_function(build, options)

    def prepare(self, model: Any) -> None:
        """After each compile: train and test functions that reduce the replicas' logs
        along no axis (module docstring), for every strategy: the same code for one
        machine and several, and replicas whose batches differ in size by one example
        (balanced chunks) never meet Keras' eager reduce of a first batch."""
        if self.strategy is None:
            return
        import tensorflow as tf

        strategy = self.strategy
        model._distribute_strategy = None  # fit runs inside strategy.scope() (see train.fit)
        model.optimizer.build(model.trainable_variables)  # here, not inside a replica

        def on_iterator(step: Callable[[Any], dict[str, Any]]) -> Any:
            if model.jit_compile:  # XLA per replica step, as Keras' own functions do
                step = tf.function(step, jit_compile=True, reduce_retracing=True)

            @tf.function(reduce_retracing=True)
            def run(iterator: Iterator[Any]) -> dict[str, Any]:
                logs = strategy.run(step, args=(next(iterator),))
                return {
                    name: strategy.reduce("MEAN", value, axis=None) for name, value in logs.items()
                }

            return run

        model.train_function = on_iterator(model.train_step)
        model.test_function = on_iterator(model.test_step)

    def describe(self, batch_size: int) -> str:
        where = ", ".join(d.rsplit("device:", 1)[-1] for d in self._devices())
        return (
            f"training on {self.replicas_in_sync} replica(s) ({self.mode}: {where}); "
            f"global batch {batch_size * self.replicas_in_sync}"
        )

    def _devices(self) -> list[str]:
        if self.strategy is None:
            return ["default device"]
        devices = list(self.strategy.extended.worker_devices)
        if self.mode == "multi_worker":
            role = cluster() or {"cluster": {}}
            workers = len(role["cluster"].get("worker", [])) + len(role["cluster"].get("chief", []))
            return [f"{workers} workers x {len(devices)} device(s)"]
        return devices


def prepare_devices(cfg: TrainConfig) -> None:
    """Configure the logical CPU devices `mirrored` trains on, now: for a process that
    starts TensorFlow (by building a model to check it) before its train stage runs."""
    if resolve_mode(cfg) != "mirrored":
        return
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        _logical_cpus(cfg.replicas)


def for_config(cfg: TrainConfig) -> Distribution:
    """The strategy for train.distribute; call before TensorFlow has run any op (logical
    CPU devices cannot be added after)."""
    mode = resolve_mode(cfg)
    if mode == "none":
        return Distribution("none")
    import tensorflow as tf

    if mode == "multi_worker":
        if cluster() is None:
            raise DistributeError(
                "train.distribute multi_worker needs TF_CONFIG in each worker's environment "
                "(README 'Multi-device and multi-machine training'), or run the train stage "
                "without it to start train.workers local workers"
            )
        return Distribution(mode, tf.distribute.MultiWorkerMirroredStrategy())
    if tf.config.list_physical_devices("GPU"):  # (listing logical ones would start TF)
        return Distribution(mode, tf.distribute.MirroredStrategy())  # every local GPU
    if cfg.xla is True:
        raise DistributeError(
            "train.xla true cannot run mirrored over logical CPU devices (XLA compiles each "
            "replica's step for CPU:0 and cannot reach the other devices' variables): set "
            "train.xla auto or false, or train.distribute none"
        )
    return Distribution(mode, tf.distribute.MirroredStrategy(_logical_cpus(cfg.replicas)))


def _logical_cpus(count: int) -> list[str]:
    """``count`` logical CPU devices, configured now if TensorFlow has not started yet."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    with contextlib.suppress(RuntimeError):  # already initialized: check what exists
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < count:
        raise DistributeError(
            f"train.replicas {count} needs {count} logical CPU devices, but TensorFlow "
            f"already started with {len(logical)} in this process: run the train stage in "
            "its own process (python -m flows.stage train, dvc repro, the Prefect flow)"
        )
    return [device.name for device in logical[:count]]


def index_batches(
    n: int, batch_size: int, shuffle_seed: int | None, epoch: Any = None, shard: Shard | None = None
):
    """Index batches of one pass: in order, or a permutation that is a function of
    (shuffle_seed, epoch); cut into the chunks ``shard`` takes (tasks/training/distribute.py)."""
    import tensorflow as tf

    shard = shard or Shard()
    bounds = chunk_bounds(n, batch_size, shard.replicas)
    ids = shard.chunk_ids(steps_per_epoch(n, batch_size, shard.replicas))
    starts, ends = tf.constant(bounds[ids], tf.int64), tf.constant(bounds[ids + 1], tf.int64)
    if shuffle_seed is None:
        order = tf.data.Dataset.from_tensors(tf.range(n, dtype=tf.int64))
    else:
        if epoch is None:  # iterated by hand: every pass is the next epoch
            passes = tf.Variable(0, dtype=tf.int64, trainable=False)
            epoch_of_pass = lambda: passes.assign_add(1) - 1  # noqa: E731
        else:  # Keras: the epoch a callback stored (the plugin may open several passes per epoch)
            epoch_of_pass = epoch.read_value

        def permutation(_: tf.Tensor) -> tf.Tensor:
            # A pure function of (seed, epoch): epoch k is the same after a resume at k.
            seed = tf.stack([tf.constant(shuffle_seed, tf.int64), epoch_of_pass()])
            return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=seed)

        order = tf.data.Dataset.from_tensors(0).map(permutation)
    return order.flat_map(
        lambda indices: tf.data.Dataset.from_tensor_slices((starts, ends)).map(
            lambda start, end: indices[start:end]
        )
    )
