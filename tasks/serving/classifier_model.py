"""The registered model's Python interface, logged with each version as MLflow model code.

MLflow copies this file into the model (models-from-code), so loading a version (in
`mlflow models serve`, `mlflow.pyfunc.load_model`, a batch job) needs MLflow, Keras and
TensorFlow but nothing from this repository. It imports none of our modules on purpose.

Input: raw pixels, NHWC, 0..255 (the schema says float32; JSON numbers are cast to it).
Output: one row per image with the top-1 ``label``, its ``class_index`` and ``score``,
and ``probabilities`` keyed by class name. Input that cannot be an image batch for this
model raises MlflowException(INVALID_PARAMETER_VALUE): the scoring server answers HTTP
400 with the message, never a stack trace.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

KERAS_ARTIFACT = "keras_model"  # the raw-pixel Keras model (.keras, stock layers only)
PREDICT_BATCH = 256  # images per Keras inference step; does not change the answers


def invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def as_pixel_batch(model_input: Any, image_shape: tuple[int, ...]) -> np.ndarray:
    """``model_input`` as a float32 (N, H, W, C) batch of 0..255 pixels, or a clear error."""
    expected = "(N, " + ", ".join(map(str, image_shape)) + ")"
    if isinstance(model_input, pd.DataFrame):
        raise invalid(
            "expected a tensor of raw pixels, got a table: send JSON "
            f'{{"inputs": [[[[p, ...], ...], ...]]}} of shape {expected}'
        )
    pixels = np.asarray(model_input)
    if pixels.ndim != len(image_shape) + 1 or tuple(pixels.shape[1:]) != tuple(image_shape):
        raise invalid(f"expected images of shape {expected} (NHWC), got shape {pixels.shape}")
    if pixels.shape[0] == 0:
        raise invalid(f"the batch is empty: send at least one image of shape {expected[4:-1]}")
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise invalid(f"expected numeric pixels (uint8 or float32, 0..255), got {pixels.dtype}")
    pixels = pixels.astype("float32")
    if not np.isfinite(pixels).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(pixels))[:, 0]})[:10]
        raise invalid(f"images {bad} contain NaN or infinite values: pixels must be 0..255")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 255:
        raise invalid(
            f"pixels must be raw values in 0..255, got {low:g}..{high:g} "
            "(send the image's pixels as they are, not normalized)"
        )
    return pixels


def quiet_tensorflow_on_cpu() -> None:
    """Fatal TensorFlow messages only on a machine without an NVIDIA GPU, where its first
    use logs "failed call to cuInit" as an error that is none for a CPU model server; a
    level the caller set (TF_CPP_MIN_LOG_LEVEL) wins, and a TensorFlow already loaded keeps
    its own. (This file is the model's code, loaded without this repository: the same rule
    lives in tasks/startup.py for the pipeline's processes.)"""
    if "tensorflow" not in sys.modules and not os.path.exists("/dev/nvidia0"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Raw pixels in, class probabilities and names out."""

    def load_context(self, context: Any) -> None:
        quiet_tensorflow_on_cpu()
        import keras

        # Safe mode: a tampered model file with a Python function in it is refused.
        self.model = keras.saving.load_model(
            context.artifacts[KERAS_ARTIFACT], compile=False, safe_mode=True
        )
        self.class_names = [str(name) for name in context.model_config["class_names"]]
        self.image_shape = tuple(int(d) for d in self.model.input_shape[1:])

    # np.ndarray is one of the hints MLflow reads no signature from (the logged one stays) and
    # stops it warning "Add type hints" at every log and load.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:  # noqa: ANN001
        pixels = as_pixel_batch(model_input, self.image_shape)
        if len(pixels) <= PREDICT_BATCH:  # one call: Keras' predict() costs ~40 ms per call
            logits = self.model(pixels, training=False)
        else:
            logits = self.model.predict(pixels, batch_size=PREDICT_BATCH, verbose=0)
        probabilities = softmax(np.asarray(logits, dtype="float64"))
        top = probabilities.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": [self.class_names[i] for i in top],
                "class_index": top.astype("int64"),
                "score": probabilities[np.arange(len(top)), top],
                "probabilities": [
                    dict(zip(self.class_names, map(float, row), strict=True))
                    for row in probabilities
                ],
            }
        )


mlflow.models.set_model(ImageClassifier())
