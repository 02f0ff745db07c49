"""The image classifiers of the seeds: the TensorFlow tutorial's CNN and a fast one for
time to accuracy. Logits out; Keras is imported when a model is built."""

from __future__ import annotations

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


def fast_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    widths: tuple[int, ...] = (64, 256, 256),
    activation: str = "gelu",
) -> Any:
    """A VGG-style net with batch norm built for time-to-accuracy, after airbench94.

    A small 3x3 stem, then one group per width: conv, 2x2 max-pool, BN, GELU, conv, BN,
    GELU; global max-pool and a bias-free linear head. airbench94 uses widths 64/256/256
    on CIFAR-10 on a GPU; narrower widths trade accuracy for CPU speed, and so does ReLU
    for GELU: on 2 CPU cores TensorFlow's exact (erf) GELU made a training step ~30% slower
    (BENCHMARKS.md section 5). BN momentum 0.9
    (Keras' default 0.99 lags behind in runs of a few epochs). Logits are float32 even
    under a mixed-precision policy, so the loss is computed in full precision.
    """
    import keras
    from keras import layers

    def conv_bn_gelu(x: Any, width: int, pool: bool) -> Any:
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        if pool:
            x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
        return layers.Activation(activation)(x)

    inputs = keras.Input(shape=input_shape)
    x = conv_bn_gelu(inputs, max(24, widths[0] // 2), pool=False)
    for width in widths:
        x = conv_bn_gelu(x, width, pool=True)
        x = conv_bn_gelu(x, width, pool=False)
    x = layers.GlobalMaxPooling2D()(x)
    outputs = layers.Dense(num_classes, use_bias=False, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="fast_cnn")
