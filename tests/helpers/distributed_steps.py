"""Three training steps of the seed CNN, on one device or mirrored over logical CPUs.

Run as ``python -m tests.helpers.distributed_steps MODE OUT.npz`` (one process per mode: logical
CPU devices exist only if configured before TensorFlow starts). Same data, seed and
global batch (128) in both modes, augmentation off: what tests/test_distribute.py
compares. Writes the first step's loss, the weights after the last step and the indices
each replica's pipeline yields in one epoch.
"""

from __future__ import annotations

import sys

import numpy as np

from tasks.config import load_config
from tasks.images import augment
from tests.helpers.project import PARAMS

GLOBAL_BATCH = 128
STEPS = 3


def main(mode: str, out: str) -> None:
    import keras

    from tasks.images.train import image_training_data
    from tasks.stages.train import _epoch_variable, fit
    from tasks.training import distribute
    from tasks.training.distribute import index_batches

    replicas = 2 if mode == "mirrored" else 1
    cfg = load_config(
        PARAMS,
        {
            "data.source": "synthetic",
            "train.distribute": mode,
            "train.replicas": replicas,
            "train.batch_size": GLOBAL_BATCH // replicas,
            "train.epochs": 1,
            "train.optimizer": "sgd",  # updates linear in the gradient (Adam divides by its root)
            "train.learning_rate": 0.01,
            "preprocess.pad": 0,
            "preprocess.flip_prob": 0.0,
        },
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (GLOBAL_BATCH * STEPS, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, len(images)).astype(np.int64)
    dist = distribute.for_config(cfg.train)
    stats = augment.channel_stats(images)
    epoch = _epoch_variable()
    data = image_training_data(
        cfg, (images, labels), (images[:128], labels[:128]), 10, stats, epoch
    )
    losses: list[float] = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    model, _ = fit(cfg, data, epoch, [record], dist=dist)
    shards = [distribute.Shard(r, 1, replicas) for r in range(replicas)]
    seen = [
        np.concatenate(
            list(index_batches(len(images), cfg.train.batch_size, 7, shard=s).as_numpy_iterator())
        )
        for s in shards
    ]
    np.savez(
        out,
        first_loss=losses[0],
        steps=len(losses),
        replicas=dist.replicas_in_sync,
        **{f"w{i}": w for i, w in enumerate(model.get_weights())},
        **{f"seen{i}": s for i, s in enumerate(seen)},
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
