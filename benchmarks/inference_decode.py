"""DALI decoding the test images as a client would upload them (JPEG), for
benchmarks/inference.py: ``cpu`` measured here, ``mixed`` (nvJPEG on the GPU) by `--gpu`.

Only the decoder's device differs between the two rows; decoded pixels are checked
against Pillow's decoding of the same files.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import summarize

JPEG_QUALITY = 95  # what a client uploading the test images would send
DECODE_BATCH = 256  # encoded images per DALI batch


def encode_jpegs(images: np.ndarray) -> list[np.ndarray]:
    """The images as JPEG files (Pillow), each a 1-D uint8 array of the file's bytes."""
    from PIL import Image

    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
            buffer, format="JPEG", quality=JPEG_QUALITY
        )
        encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    return encoded


def decode_pipeline(device: str, channels: int) -> Any:
    """DALI's image decoder fed encoded bytes; ``mixed`` decodes on the GPU (nvJPEG)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=DECODE_BATCH,
        num_threads=len(os.sched_getaffinity(0)),
        device_id=0 if device == "mixed" else None,  # without CUDA it must be None
        prefetch_queue_depth=1,
    )
    def decode() -> Any:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        kind = types.GRAY if channels == 1 else types.RGB
        return fn.decoders.image(encoded, device=device, output_type=kind)

    pipe = decode()
    pipe.build()
    return pipe


def max_diff_vs_pillow(decoded: list[np.ndarray], jpegs: list[np.ndarray]) -> int:
    from PIL import Image

    return max(
        int(
            np.abs(
                ours.astype(int)
                - np.asarray(Image.open(io.BytesIO(jpeg.tobytes()))).reshape(ours.shape).astype(int)
            ).max()
        )
        for ours, jpeg in zip(decoded, jpegs, strict=True)
    )


def decode_worker(
    device: str, test_images: np.ndarray, warmup: int, repeats: int, out: Path
) -> None:
    """images/s decoding every full batch of ``test_images`` as JPEG, ``repeats`` passes
    after ``warmup`` untimed batches; writes ``out``."""
    jpegs = encode_jpegs(test_images)
    pipe = decode_pipeline(device, test_images.shape[-1])
    starts = list(range(0, len(jpegs) - DECODE_BATCH + 1, DECODE_BATCH))

    def run_batch(start: int) -> list[np.ndarray]:
        pipe.feed_input("encoded", jpegs[start : start + DECODE_BATCH])
        [decoded] = pipe.run()
        decoded = decoded.as_cpu() if device == "mixed" else decoded
        return [np.asarray(decoded[i]) for i in range(len(decoded))]

    max_diff = max_diff_vs_pillow(run_batch(0), jpegs[:DECODE_BATCH])
    for start in starts[:warmup]:
        run_batch(start)
    rates = []
    for _ in range(repeats):
        begin = time.perf_counter()
        for start in starts:
            run_batch(start)
        rates.append(len(starts) * DECODE_BATCH / (time.perf_counter() - begin))
    result = {
        "device": device,
        "batch_size": DECODE_BATCH,
        "jpeg_quality": JPEG_QUALITY,
        "threads": f"DALI num_threads = {len(os.sched_getaffinity(0))} (usable CPUs)",
        "images_per_s": summarize(rates),
        "images_per_pass": len(starts) * DECODE_BATCH,
        "jpeg_bytes_mean": float(np.mean([len(j) for j in jpegs])),
        "max_abs_diff_vs_pillow": max_diff,
    }
    out.write_text(json.dumps(result))
