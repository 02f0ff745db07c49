"""Train-stage images/s on one device, 2 mirrored CPU replicas and 2 local workers.

Each side is `tasks.stages.train.train_model` (DALI batches, seed_cnn, params.yaml's recipe) on
the same synthetic CIFAR-shaped images, in its own process(es): ``one_device`` at batch 64
and at batch 128 (the others' global batch), ``mirrored`` (`train.distribute=mirrored`,
2 logical CPU devices, 64 per replica), ``multi_worker`` (2 worker processes on loopback
ports, TF_CONFIG each, 64 per replica). The first epoch (tracing, strategy start-up) is not
timed. On a 2-core machine the replicas share the same cores, so this measures what the
distribution costs, not a speed-up.

    python -m benchmarks.distributed [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
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
from benchmarks.markdown import code, load, missing, spread, table
from benchmarks.train_throughput import epoch_timer, steady_rate
from tasks import startup

SIDES = {  # name -> (train.distribute, per-replica batch)
    "one_device_64": ("none", 64),
    "one_device_128": ("none", 128),
    "mirrored_2x64": ("mirrored", 64),
    "multi_worker_2x64": ("multi_worker", 64),
}
SIZES = {
    False: {"images": 10_000, "epochs": 3, "repeats": 3},
    True: {"images": 1_000, "epochs": 2, "repeats": 1},
}


def config(side: str, quick: bool) -> Any:
    from tasks.config import load_config

    distribute, batch = SIDES[side]
    return load_config(
        PARAMS,
        {
            "data.source": "synthetic",
            "data.synthetic.train_size": SIZES[quick]["images"],
            "data.synthetic.test_size": 10,  # unused
            "model.name": "seed_cnn",
            "train.epochs": SIZES[quick]["epochs"],
            "train.batch_size": batch,
            "train.distribute": distribute,
            "train.replicas": 2,
        },
    )


def worker(side: str, quick: bool, out: Path) -> None:
    """Train in this process (one worker of the cluster for multi_worker); the chief
    writes the per-epoch timings to ``out``."""
    from tasks.images import augment, data
    from tasks.stages import train
    from tasks.training import distribute

    cfg = config(side, quick)
    with tempfile.TemporaryDirectory() as root:
        dataset = data.prepare_dataset(cfg.data, Path(root))
    train_split, val_split = dataset.split("train"), dataset.split("val")
    stats = augment.channel_stats(train_split[0])
    timer = epoch_timer()
    train.train_model(cfg, train_split, val_split, dataset.num_classes, stats, [timer])
    if distribute.is_chief():
        timings = {"train_s": timer.train_s, "epoch_s": timer.epoch_s, "cpu_s": timer.train_cpu_s}
        out.write_text(json.dumps({"train_images": len(train_split[1]), **timings}))


def run_side(side: str, quick: bool, scratch: Path) -> dict[str, Any]:
    from tasks.training.workers import free_ports, tf_config

    out = scratch / f"{side}.json"
    args = ["--worker", side, "--out", str(out), *(["--quick"] if quick else [])]
    env = child_env(scratch)
    if SIDES[side][0] != "multi_worker":
        run_measured(
            python_module("benchmarks.distributed", *args),
            cwd=REPO,
            env=env,
            log=scratch / f"{side}.log",
        )
        return json.loads(out.read_text())
    hosts = [f"127.0.0.1:{port}" for port in free_ports(2)]
    other = subprocess.Popen(
        python_module("benchmarks.distributed", *args),
        cwd=REPO,
        env={**env, "TF_CONFIG": tf_config(hosts, 1)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_measured(
            python_module("benchmarks.distributed", *args),
            cwd=REPO,
            env={**env, "TF_CONFIG": tf_config(hosts, 0)},
            log=scratch / f"{side}.log",
        )
        assert other.wait(timeout=120) == 0, "worker 1 failed"
    finally:
        if other.poll() is None:
            other.kill()
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results/quick/")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    startup.prepare_process()  # the pipeline's defaults (oneDNN on), for children too
    if args.worker:
        worker(args.worker, args.quick, args.out)
        return 0

    load_before = load_average()
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for repeat in range(SIZES[args.quick]["repeats"]):
            order = list(SIDES) if repeat % 2 == 0 else list(SIDES)[::-1]
            for side in order:  # alternating, so every side sees the machine's drift
                results[side] = run_side(side, args.quick, Path(tmp))
                rates[side].append(steady_rate(results[side], "train_s"))
                log(f"repeat {repeat + 1} {side}: {rates[side][-1]:,.0f} img/s")
    rows = []
    for side, (distribute, batch) in SIDES.items():
        replicas = 1 if distribute == "none" else 2
        row = {
            "key": side,
            "distribute": distribute,
            "replicas": replicas,
            "per_replica_batch": batch,
            "global_batch": batch * replicas,
            "train_images": results[side]["train_images"],
            "timed_epochs": len(results[side]["train_s"]) - 1,
            "img_per_s": summarize(rates[side]),
        }
        rows.append(stamp_row(row, load_before))
    path = write_rows(
        "distributed",
        args.quick,
        rows,
        command=command("benchmarks.distributed", quick=args.quick),
        cpu_count=os.cpu_count(),
    )
    log(f"wrote {path}")
    return 0


def distributed_section(result: dict[str, Any] | None, quick: bool) -> str:
    text = """## 8. Several CPU replicas and local workers

Train-stage images/s (`tasks.stages.train.train_model`: DALI batches, seed_cnn, params.yaml's
recipe, augmentation on) on synthetic CIFAR-shaped images, each side in its own
process(es): one device at batch 64 and at batch 128, `train.distribute=mirrored` on 2
logical CPU devices and `multi_worker` with 2 local worker processes (TF_CONFIG on
loopback ports), both 64 per replica (global batch 128). The first epoch (tracing,
strategy start-up) is not timed. Both replicas share the machine's two cores, so no side
can be a speed-up here: this is what distribution costs. On GPUs: not measured (no GPU
here); on a multi-GPU machine `python -m flows.pipeline train.distribute=mirrored` trains
on every GPU.

"""
    if not result:
        return text + missing("distributed", quick)
    rows = [
        [
            code(row["key"]),
            str(row["replicas"]),
            f"{row['global_batch']}",
            spread(row["img_per_s"]),
            load(row),
        ]
        for row in result["rows"]
    ]
    headers = ["side", "replicas", "global batch", "img/s (wall)", "load (1 min, before/after)"]
    first = result["rows"][0]
    by_key = {row["key"]: row["img_per_s"]["median"] for row in result["rows"]}
    same_batch = by_key["one_device_128"]
    return (
        text
        + table(headers, rows)
        + f"\n\nAgainst one device at the same global batch (medians): mirrored "
        f"{by_key['mirrored_2x64'] / same_batch:.2f}x, two local workers "
        f"{by_key['multi_worker_2x64'] / same_batch:.2f}x (two TensorFlow runtimes on two "
        "cores, gradients all-reduced over loopback gRPC)."
        + f"\n\n{first['train_images']:,} training images, {first['timed_epochs']} timed "
        f"epoch(s) per side and repeat, sides alternating. Command: {code(result['command'])}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
