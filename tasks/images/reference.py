"""The DALI training transform (tasks/images/augment.py) written again in NumPy, with its
randomness explicit: the oracle tests/test_augment.py compares DALI's output with, and
the baseline benchmarks/input_pipeline.py measures. No stage imports it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.images.augment import reshape_for


def augment_reference(
    images: np.ndarray,
    offsets: np.ndarray,
    flips: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    input_shape: tuple[int, int, int] | None = None,
    erasures: np.ndarray | None = None,
) -> np.ndarray:
    """NumPy version of the train transform with explicit randomness.

    ``offsets[i] = (dy, dx)`` is the crop anchor: output[y, x] = image[y + dy, x + dx],
    0 outside the image; then the crop is mirrored left-right where ``flips[i]``, resized
    to ``input_shape`` with `resize_reference` and gray repeated as RGB when the model
    wants that (DALI mirrors after resizing; the two commute), then normalized to float32
    (pixel - mean) / std. ``erasures[i] = (y0, x0, height, width)``: the rectangle of the
    model's input set to 0 (the channel mean) afterwards; height or width 0 erases nothing.
    """
    n, height, width, _ = images.shape
    offsets = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    pad = int(np.abs(offsets).max(initial=0))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = np.arange(height)[None, :] + offsets[:, :1] + pad  # (n, H)
    cols = np.arange(width)[None, :] + offsets[:, 1:] + pad  # (n, W)
    flips = np.asarray(flips, dtype=bool).reshape(n)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    reshape = reshape_for(images.shape[1:], input_shape)
    if reshape.size is not None:
        out = resize_reference(out, reshape.size)
    if reshape.gray_to_rgb:
        out = np.repeat(out, 3, axis=-1)
    mean_arr = np.asarray(mean, dtype=np.float64)
    std_arr = np.asarray(std, dtype=np.float64)
    out = ((out - mean_arr) / std_arr).astype(np.float32)
    for i, (y0, x0, rows, cols) in enumerate([] if erasures is None else erasures):
        out[i, y0 : y0 + rows, x0 : x0 + cols] = 0.0
    return out


def resize_reference(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of NHWC images to ``size`` (H, W), float64: sample points at pixel
    centers, (i + 0.5) * in / out - 0.5, clamped to the edge pixels. This is
    keras.layers.Resizing(interpolation="bilinear") / tf.image.resize, and DALI's linear
    resize without antialiasing (tests/test_augment.py measures both)."""
    out = images.astype(np.float64)
    for axis, new in ((1, size[0]), (2, size[1])):
        old = out.shape[axis]
        source = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0, old - 1)
        low = np.floor(source).astype(np.int64)
        high = np.minimum(low + 1, old - 1)
        weight = (source - low).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, low, axis) * (1 - weight) + np.take(out, high, axis) * weight
    return out
