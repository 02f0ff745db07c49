"""One export format measured in its own process, for benchmarks/inference.py: load,
batch-1 latency, images/s at each batch size, and the top-1 class of every test image.

A format is run the way the project runs it: the Keras model through Keras, each file the
export stage wrote through its runner in tasks/serving/formats.py (the export stage's
parity.json lists them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import summarize

EXPORT_ORDER = ("saved_model", "litert_fp32", "litert_dynamic", "litert_int8", "onnx")
BATCHES = (1, 32, 256)  # images per call for the images/s columns
ACCURACY_BATCH = 256  # images per call when scoring the test split; does not change answers
PYFUNC_PREDICT_BATCH = 256  # classifier_model.PREDICT_BATCH (not imported: it sets the model)
# Threads each runtime computes with, as the project loads it: nothing sets them, so
# LiteRT runs one thread (formats.run_litert passes no num_threads) and the others use
# their defaults.
THREADS = {
    "keras": "TF default (all cores)",
    "saved_model": "TF default (all cores)",
    "litert": "1 (LiteRT default)",
    "onnx": "ORT default (physical cores)",
}


@dataclass(frozen=True)
class Sizes:
    warmup_calls: int  # untimed calls before every timed block (first-call tracing, buffers)
    latency_calls: int  # timed batch-1 calls per format
    repeats: int  # throughput windows per batch size
    window_s: float  # seconds; each window also makes at least MIN_WINDOW_CALLS calls
    http_calls: int  # timed requests per batch size


MIN_WINDOW_CALLS = 3


@dataclass(frozen=True)
class Variant:
    key: str
    runtime: str  # key of THREADS
    file: str | None  # under exports/, for exported formats
    quantized: bool


def variants(workdir: Path) -> list[Variant]:
    """The Keras rows, then every format the export stage wrote, in its own order."""
    from tasks.workspace import Workspace, read_json

    exported = read_json(Workspace(workdir).parity)["formats"]
    rows = [Variant("keras", "keras", None, False), Variant("keras_predict", "keras", None, False)]
    for key in sorted(exported, key=export_rank):
        row = exported[key]
        runner = {".tflite": "litert", ".onnx": "onnx", "": "saved_model"}[Path(row["file"]).suffix]
        rows.append(Variant(key, runner, row["file"], row["quantized"]))
    return rows


def export_rank(variant: str) -> tuple[int, str]:
    """Table order: EXPORT_ORDER, then any newer format by name."""
    return (EXPORT_ORDER.index(variant) if variant in EXPORT_ORDER else len(EXPORT_ORDER), variant)


def load_predict(variant: Variant, workdir: Path, model: dict[str, Any]) -> Callable:
    """``predict(float32 pixels) -> probabilities`` the way the project runs this format."""
    from tasks.serving import formats

    if variant.file is not None:
        return formats.RUNNERS[variant.runtime](workdir / "exports" / variant.file)
    import mlflow

    from tasks.tracking import registry

    mlflow.set_tracking_uri(model["store"])
    keras_model = formats.probabilities_model(
        registry.load_version(model["name"], model["version"])
    )
    if variant.key == "keras_predict":
        return lambda x: keras_model.predict(x, batch_size=PYFUNC_PREDICT_BATCH, verbose=0)
    return keras_model.predict_on_batch


def batches(pixels: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive full batches of the test images, round and round."""
    starts = range(0, len(pixels) - size + 1, size)
    while True:
        for start in starts:
            yield pixels[start : start + size]


def latency_ms(predict: Callable, pixels: np.ndarray, sizes: Sizes) -> dict[str, Any]:
    """Milliseconds per batch-1 call: each timed call on the next test image."""
    source = batches(pixels, 1)
    for _ in range(sizes.warmup_calls):
        predict(next(source))
    times = []
    for _ in range(sizes.latency_calls):
        image = next(source)
        start = time.perf_counter()
        predict(image)
        times.append((time.perf_counter() - start) * 1e3)
    return percentiles(times)


def percentiles(times_ms: list[float]) -> dict[str, Any]:
    values = np.asarray(times_ms)
    return {
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": len(values),
        "values": [round(v, 4) for v in times_ms],
    }


def images_per_s(predict: Callable, pixels: np.ndarray, batch: int, sizes: Sizes) -> dict:
    """Back-to-back calls at ``batch``: one images/s figure per window, REPEATS windows."""
    source = batches(pixels, batch)
    for _ in range(sizes.warmup_calls):
        predict(next(source))
    rates = []
    for _ in range(sizes.repeats):
        calls, start = 0, time.perf_counter()
        while True:
            predict(next(source))
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= sizes.window_s and calls >= MIN_WINDOW_CALLS:
                break
        rates.append(calls * batch / elapsed)
    return summarize(rates)


def test_predictions(predict: Callable, pixels: np.ndarray) -> np.ndarray:
    """Top-1 class of every test image."""
    chunks = [
        predict(pixels[i : i + ACCURACY_BATCH]) for i in range(0, len(pixels), ACCURACY_BATCH)
    ]
    return np.concatenate([np.asarray(c).argmax(axis=1) for c in chunks])


def format_worker(variant: Variant, workdir: Path, model: dict, sizes: Sizes, out: Path) -> None:
    """Everything measured for one format, in this process; writes ``out`` (.json, .npy)."""
    from tasks import prepared

    images, labels = prepared.load_split(workdir / "data" / "prepared", "test")
    pixels = images.astype("float32")  # raw 0..255, what every serving signature takes
    start = time.perf_counter()
    predict = load_predict(variant, workdir, model)
    predict(pixels[:1])  # the first answer is part of loading
    load_s = time.perf_counter() - start
    predicted = test_predictions(predict, pixels)
    result = {
        "load_s": load_s,
        "latency_ms_batch1": latency_ms(predict, pixels, sizes),
        "images_per_s": {str(b): images_per_s(predict, pixels, b, sizes) for b in BATCHES},
        "accuracy": float((predicted == labels).mean()),
        "test_images": len(labels),
    }
    np.save(out.with_suffix(".npy"), predicted)
    out.write_text(json.dumps(result))
