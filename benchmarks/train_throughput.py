"""Train-stage images/s vs the bare seed Keras script, as a ratio measured in the same run.

Both sides train seed_cnn (`tasks.models.cnn.seed_cnn`) with params.yaml's seed recipe (Adam,
learning rate 1e-3, batch 64) on the same synthetic CIFAR-shaped data, with the same
validation split evaluated after every epoch:

* ``stage``: `tasks.stages.train.train_model`, what the train stage runs: DALI-augmented batches
  from uint8 arrays (`dali_dataset`), op determinism on (`seed_everything`);
* ``bare``: the TensorFlow-tutorial script, `model.fit(x, y, batch_size=64)` on float32
  arrays normalized once in memory, no augmentation, no determinism.

Each side runs in its own process, alternating (bare, stage, stage, bare, ...), so both see
the same machine state; the first epoch (tracing, pipeline build) is not timed. Throughput
counts the training part of each epoch (epoch start to validation start); whole epochs,
validation included, are recorded too.

    python -m benchmarks.train_throughput [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PARAMS,
    REPO,
    child_env,
    command,
    load_average,
    log,
    python_module,
    run_measured,
    stamp_row,
    summarize,
    write_rows,
)
from benchmarks.markdown import code, load, missing, spread, table, verdict
from tasks import startup

SIDES = ("bare", "stage")
# synthetic images before the 10% validation hold-out; epochs include one untimed warm-up
SIZES = {
    False: {"images": 15_000, "epochs": 3, "repeats": 3},
    True: {"images": 1_500, "epochs": 2, "repeats": 2},
}


def config(quick: bool) -> Any:
    from tasks.config import load_config

    size = SIZES[quick]
    return load_config(
        PARAMS,
        {
            "data.source": "synthetic",
            "data.synthetic.train_size": size["images"],
            "data.synthetic.test_size": 10,  # unused
            "model.name": "seed_cnn",
            "train.epochs": size["epochs"],
        },
    )


def epoch_timer() -> Any:
    """A Keras callback recording, per epoch, wall seconds of training and of the whole
    epoch, and the process's CPU seconds (all threads) of training: on a busy machine CPU
    time per image is steadier than wall time."""
    import keras

    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.train_s: list[float] = []
            self.epoch_s: list[float] = []
            self.train_cpu_s: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._begin, self._train_end = now(), None

        def on_test_begin(self, logs: Any = None) -> None:  # validation starts
            self._train_end = self._train_end or now()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            end = now()
            train_end = self._train_end or end
            self.train_s.append(train_end[0] - self._begin[0])
            self.train_cpu_s.append(train_end[1] - self._begin[1])
            self.epoch_s.append(end[0] - self._begin[0])

    return EpochTimer()


def bare_fit(cfg: Any, train: tuple, val: tuple, num_classes: int, stats: Any, timer: Any) -> None:
    """The seed script: normalize once in memory, then `model.fit` on the arrays."""
    import keras
    import numpy as np

    from tasks.models.cnn import seed_cnn

    keras.utils.set_random_seed(cfg.train.seed)
    mean, std = (np.asarray(v, np.float32) for v in stats)
    x, y = ((train[0] - mean) / std).astype(np.float32), train[1]
    x_val = ((val[0] - mean) / std).astype(np.float32)
    model = seed_cnn(x.shape[1:], num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.train.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x,
        y,
        batch_size=cfg.train.batch_size,
        epochs=cfg.train.epochs,
        validation_data=(x_val, val[1]),
        callbacks=[timer],
        verbose=2,
    )


def worker(side: str, quick: bool, out: Path) -> None:
    """One side, in this process: train, then write the per-epoch timings to ``out``."""
    from tasks.images import augment, data
    from tasks.stages import train

    cfg = config(quick)
    with tempfile.TemporaryDirectory() as root:
        dataset = data.prepare_dataset(cfg.data, Path(root))
    train_split, val_split = dataset.split("train"), dataset.split("val")
    stats = augment.channel_stats(train_split[0])
    timer = epoch_timer()
    if side == "stage":
        train.train_model(cfg, train_split, val_split, dataset.num_classes, stats, [timer])
    else:
        bare_fit(cfg, train_split, val_split, dataset.num_classes, stats, timer)
    timings = {"train_s": timer.train_s, "epoch_s": timer.epoch_s, "cpu_s": timer.train_cpu_s}
    out.write_text(json.dumps({"train_images": len(train_split[1]), **timings}))


def steady_rate(result: dict[str, Any], key: str) -> float:
    """Images/s over the timed epochs (all but the first)."""
    timed = result[key][1:]
    return result["train_images"] * len(timed) / sum(timed)


def run_sides(quick: bool, scratch: Path) -> list[dict[str, Any]]:
    """Per repeat, each side's worker result; the order alternates between repeats."""
    runs = []
    for repeat in range(SIZES[quick]["repeats"]):
        results = {}
        for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
            out = scratch / f"{side}-{repeat}.json"
            args = ["--worker", side, "--out", str(out), *(["--quick"] if quick else [])]
            run_measured(
                python_module("benchmarks.train_throughput", *args),
                cwd=REPO,
                env=child_env(scratch),
                log=scratch / f"{side}-{repeat}.log",
            )
            results[side] = json.loads(out.read_text())
        runs.append(results)
        stage, bare = (steady_rate(results[side], "train_s") for side in ("stage", "bare"))
        log(f"train repeat {repeat + 1}: stage {stage:,.0f} img/s, bare {bare:,.0f} img/s")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results/quick/")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    startup.prepare_process()  # the pipeline's defaults (oneDNN on), for children too
    if args.worker:
        worker(args.worker, args.quick, args.out)
        return 0

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        runs = run_sides(args.quick, Path(tmp))
    # images/s over: the training part of epochs (wall), whole epochs, training CPU time
    kinds = {"train": "train_s", "epoch": "epoch_s", "train_per_cpu_s": "cpu_s"}
    rates = {
        side: {kind: [steady_rate(run[side], key) for run in runs] for kind, key in kinds.items()}
        for side in SIDES
    }
    ratios = {
        kind: [s / b for s, b in zip(rates["stage"][kind], rates["bare"][kind], strict=True)]
        for kind in kinds
    }
    row = {
        "key": "seed_cnn",
        "model": "seed_cnn",
        "batch_size": config(args.quick).train.batch_size,
        "train_images": runs[0]["stage"]["train_images"],
        "timed_epochs_per_run": SIZES[args.quick]["epochs"] - 1,
        "images_per_s": {side: {k: summarize(v) for k, v in rates[side].items()} for side in SIDES},
        "ratio_stage_over_bare": {k: summarize(v) for k, v in ratios.items()},
        "target_ratio": 0.95,
        "runs": runs,
        "command": command("benchmarks.train_throughput", quick=args.quick),
    }
    write_rows("train_throughput", args.quick, [stamp_row(row, load_before)])
    log(f"train ratio median {statistics.median(ratios['train']):.3f}")
    return 0


def train_section(result: dict[str, Any] | None, quick: bool) -> str:
    text = """## 2. Train stage vs the bare seed Keras script

seed_cnn, Adam 1e-3, same synthetic CIFAR-shaped data, same batch, same validation split.
*Stage*: `tasks.stages.train.train_model` (DALI-augmented batches, op determinism on). *Bare*: the
TensorFlow-tutorial script, `model.fit` on float32 arrays normalized once in memory, no
augmentation. Each run is its own process, alternating bare/stage; the first epoch of each
run is not timed. Ratio = stage images/s / bare images/s, per repeat.

"""
    if not result:
        return text + missing("train_throughput", quick)
    row = result["rows"][0]
    rates, ratios = row["images_per_s"], row["ratio_stage_over_bare"]
    labels = {
        "train": "training part of each epoch (wall)",
        "epoch": "whole epoch incl. validation (wall)",
        "train_per_cpu_s": "training part, per CPU-second (all threads)",
    }
    rows = [
        [
            label,
            spread(rates["stage"][kind]),
            spread(rates["bare"][kind]),
            spread(ratios[kind], "{:.3f}"),
            ", ".join(f"{v:.3f}" for v in ratios[kind]["values"]),
        ]
        for kind, label in labels.items()
    ]
    text += (
        f"{row['train_images']:,} training images, batch {row['batch_size']}, "
        f"{row['timed_epochs_per_run']} timed epoch(s) per run. Load {load(row)}. "
        f"Command: {code(row['command'])}\n\n"
    )
    headers = ["images/s over", "stage", "bare", "ratio", "ratio per repeat"]
    text += table(headers, rows) + "\n"
    met = ratios["train"]["median"] >= row["target_ratio"]
    text += f"\nTarget: ratio >= {row['target_ratio']} (training part, wall): {verdict(met)}.\n"
    return text


if __name__ == "__main__":
    sys.exit(main())
