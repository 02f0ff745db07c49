"""Model builders, looked up by `model.name` in params.yaml.

Builders take the input shape and class count from the dataset's metadata, so the
same model name works for CIFAR-10 (32x32x3) and MNIST-family data (28x28x1).
They use only keras.layers, so the models run on any Keras 3 backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def seed_cnn(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """The TensorFlow CIFAR-10 tutorial CNN the project grew from; outputs logits."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(num_classes),
        ],
        name="seed_cnn",
    )


MODEL_BUILDERS: dict[str, Callable[[tuple[int, int, int], int], Any]] = {
    "seed_cnn": seed_cnn,
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> Any:
    return MODEL_BUILDERS[name](input_shape, num_classes)


def with_normalization(model: Any, mean: list[float], std: list[float]) -> Any:
    """Wrap a trained model so it takes raw pixels (0..255) instead of DALI-normalized input.

    Training sees images normalized by the DALI pipeline; the registered model carries
    the same per-channel mean/std so a consumer of the registry needs nothing else.
    """
    import keras
    import numpy as np

    variance = (np.asarray(std, dtype="float32") ** 2).tolist()
    return keras.Sequential(
        [
            keras.Input(shape=model.input_shape[1:], name="pixels"),
            keras.layers.Normalization(mean=mean, variance=variance, name="normalize"),
            model,
        ],
        name=f"{model.name}_raw_pixels",
    )
