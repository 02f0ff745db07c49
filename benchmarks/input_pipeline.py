"""Input pipeline images/s: DALI (the project's path) vs tf.data vs NumPy, same augmentation.

Every variant makes one epoch of training batches from uint8 CIFAR-shaped images in RAM:
shuffle, gather a batch, random translate (zero-pad 4, crop back, integer offsets uniform
in [-4, 4]), horizontal flip with p=0.5, per-channel normalize to float32.

* ``dali_dataset``: `tasks.images.augment.dali_dataset`, the tf.data.Dataset Keras trains on
  (index shuffle + gather in tf.data, augmentation in DALI through its TF plugin).
* ``dali_pipeline``: `build_train_pipeline` + `iterate_numpy`, DALI alone into NumPy
  (no shuffle: input order).
* ``tf_data``: the baseline below, a vectorized batched map; the only tf.data version
  of the augmentation in this repository, checked against the NumPy reference first.
* ``numpy``: `augment_reference` with random offsets/flips, plus the per-batch gather
  (single thread).

    python -m benchmarks.input_pipeline [--variant tf_data] [--batch-size 256] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import PARAMS, command, load_average, log, stamp_row, summarize, write_rows
from benchmarks.markdown import code, load, missing, spread, table
from tasks import startup

VARIANTS = ("dali_dataset", "dali_pipeline", "tf_data", "numpy")
BATCH_SIZES = (64, 256)  # the seed recipe's batch and the fast profile's
SIZES = {  # images per epoch, timed epochs per (variant, batch size)
    False: {"images": 50_000, "repeats": 5},
    True: {"images": 2_048, "repeats": 3},
}
IMAGE_SHAPE = (32, 32, 3)


def tf_augment(images: Any, offsets: Any, flips: Any, mean: Any, std: Any, pad: int) -> Any:
    """The train transform in TensorFlow, vectorized over a batch; semantics of
    `augment_reference`: out[y, x] = image[y + dy, x + dx] (0 outside), mirror, normalize."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    rows = tf.range(height)[None, :] + offsets[:, :1] + pad  # (B, H)
    cols = tf.range(width)[None, :] + offsets[:, 1:] + pad  # (B, W)
    cols = tf.where(flips[:, None], tf.reverse(cols, axis=[1]), cols)
    crops = tf.gather(padded, rows, axis=1, batch_dims=1)  # (B, H, W + 2 pad, C)
    crops = tf.gather(crops, cols, axis=2, batch_dims=1)  # (B, H, W, C)
    return (tf.cast(crops, tf.float32) - mean) / std


def tf_data_baseline(
    images: np.ndarray, labels: np.ndarray, stats: Any, batch_size: int, pad: int, flip_prob: float
) -> Any:
    """Shuffled batches, augmented by one vectorized map per batch, run in parallel."""
    import tensorflow as tf

    images_t, labels_t = tf.constant(images), tf.constant(labels)
    mean = tf.constant(stats.mean, tf.float32)
    std = tf.constant(stats.std, tf.float32)

    def augment_batch(indices: Any) -> tuple[Any, Any]:
        count = tf.shape(indices)[0]
        offsets = tf.random.uniform((count, 2), -pad, pad + 1, dtype=tf.int32)
        flips = tf.random.uniform((count,)) < flip_prob
        batch = tf.gather(images_t, indices)
        return tf_augment(batch, offsets, flips, mean, std, pad), tf.gather(labels_t, indices)

    return (
        tf.data.Dataset.range(len(images))
        .shuffle(len(images), seed=0, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def tf_max_error(images: np.ndarray, stats: Any, pad: int) -> float:
    """Max |tf_augment - augment_reference| over one batch with the same random draws."""
    from tasks.images.reference import augment_reference

    rng = np.random.default_rng(1)
    batch = images[:256]
    offsets = rng.integers(-pad, pad + 1, size=(len(batch), 2)).astype(np.int32)
    flips = rng.random(len(batch)) < 0.5
    expected = augment_reference(batch, offsets, flips, stats.mean, stats.std)
    mean, std = (np.asarray(v, np.float32) for v in stats)
    got = tf_augment(batch, offsets, flips, mean, std, pad).numpy()
    return float(np.abs(got - expected).max())


def epoch_runner(
    variant: str, images: np.ndarray, labels: np.ndarray, stats: Any, batch_size: int, pre: Any
) -> Callable[[], None]:
    """A function that produces one epoch of augmented batches and discards them.

    ``pre`` is params.yaml's preprocess section (pad, flip_prob, num_threads, device).
    """
    from tasks.images import augment
    from tasks.images.reference import augment_reference
    from tasks.training.device import resolve_device

    if variant in ("dali_dataset", "tf_data"):
        if variant == "dali_dataset":
            dataset = augment.dali_dataset(
                images, labels, stats=stats, batch_size=batch_size, train=True, preprocess=pre
            )
        else:
            dataset = tf_data_baseline(images, labels, stats, batch_size, pre.pad, pre.flip_prob)

        def run_tf() -> None:
            for batch, _ in dataset:
                batch.shape  # noqa: B018 (eager tensors: already computed; touch, don't copy)

        return run_tf
    if variant == "dali_pipeline":
        pipe = augment.build_train_pipeline(
            images,
            labels,
            mean=stats.mean,
            std=stats.std,
            batch_size=batch_size,
            pad=pre.pad,
            flip_prob=pre.flip_prob,
            seed=0,
            device=resolve_device(pre.device),
            num_threads=pre.num_threads,
        )

        def run_dali() -> None:
            for _batch in augment.iterate_numpy(pipe):
                pass

        return run_dali
    rng = np.random.default_rng(0)

    def run_numpy() -> None:
        order = rng.permutation(len(images))
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            offsets = rng.integers(-pre.pad, pre.pad + 1, size=(len(index), 2))
            flips = rng.random(len(index)) < pre.flip_prob
            augment_reference(images[index], offsets, flips, stats.mean, stats.std)
            labels[index]  # noqa: B018 (the label gather every batch pays)

    return run_numpy


def measure(
    variant: str, batch_size: int, images: np.ndarray, labels: np.ndarray, quick: bool
) -> dict[str, Any]:
    from tasks.config import load_config
    from tasks.images.augment import channel_stats

    pre = load_config(PARAMS).preprocess
    stats = channel_stats(images)
    load_before = load_average()
    run_epoch = epoch_runner(variant, images, labels, stats, batch_size, pre)
    run_epoch()  # warm-up: pipeline build, tracing, first allocations
    seconds = []
    for _ in range(SIZES[quick]["repeats"]):
        start = time.perf_counter()
        run_epoch()
        seconds.append(time.perf_counter() - start)
    row = {
        "key": f"{variant}/{batch_size}",
        "variant": variant,
        "batch_size": batch_size,
        "images": len(images),
        "images_per_s": summarize([len(images) / s for s in seconds]),
        "command": command(
            "benchmarks.input_pipeline",
            "--variant",
            variant,
            "--batch-size",
            str(batch_size),
            quick=quick,
        ),
    }
    if variant == "tf_data":
        row["max_abs_error_vs_numpy"] = tf_max_error(images, stats, pre.pad)
    log(f"input {variant} batch {batch_size}: {row['images_per_s']['median']:,.0f} img/s")
    return stamp_row(row, load_before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.input_pipeline", description=__doc__
    )
    parser.add_argument("--variant", action="append", choices=VARIANTS)
    parser.add_argument("--batch-size", action="append", type=int)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results/quick/")
    args = parser.parse_args(argv)
    startup.prepare_process()  # the pipeline's defaults (oneDNN on), for children too
    rng = np.random.default_rng(0)  # content does not matter for speed; size and dtype do
    count = SIZES[args.quick]["images"]
    images = rng.integers(0, 256, size=(count, *IMAGE_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count).astype(np.int64)
    rows = [
        measure(variant, batch_size, images, labels, args.quick)
        for batch_size in args.batch_size or BATCH_SIZES
        for variant in args.variant or VARIANTS
    ]
    write_rows("input_pipeline", args.quick, rows)
    return 0


def input_section(result: dict[str, Any] | None, quick: bool) -> str:
    text = """## 1. Input pipeline: images/s

One epoch of augmented training batches from uint8 32x32x3 images in RAM (shuffle, pad-4
random integer translate, horizontal flip p=0.5, normalize to float32), after one untimed
warm-up epoch. `dali_dataset` is what Keras trains on (`tasks.images.augment.dali_dataset`: index
shuffle + gather in tf.data, augmentation in DALI via its TF plugin); `dali_pipeline` is
DALI alone (`build_train_pipeline` + `iterate_numpy`, input order, output to NumPy);
`tf_data` is the vectorized batched-map baseline in `benchmarks/input_pipeline.py`;
`numpy` is `augment_reference` with random offsets/flips plus the batch gather, one thread.
DALI runs `preprocess.num_threads` CPU threads.

"""
    if not result:
        return text + missing("input_pipeline", quick)
    rows = [
        [
            code(row["variant"]),
            str(row["batch_size"]),
            f"{row['images']:,}",
            spread(row["images_per_s"]),
            load(row),
            code(row["command"]),
        ]
        for row in result["rows"]
    ]
    headers = ["variant", "batch", "images/epoch", "images/s", "load", "command"]
    text += table(headers, rows) + "\n"
    errors = [
        row["max_abs_error_vs_numpy"] for row in result["rows"] if row["variant"] == "tf_data"
    ]
    if errors:
        text += (
            f"\nThe tf.data baseline's output matches `augment_reference` for the same offsets "
            f"and flips to within {max(errors):.1e} (max absolute error, checked each run).\n"
        )
    return text


if __name__ == "__main__":
    raise SystemExit(main())
