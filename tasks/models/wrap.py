"""A trained image classifier wrapped to take raw pixels: normalization, any resize to
the model's input and test-time flips inside the model, in stock Keras layers, so the
registered and exported model needs no project code."""

from __future__ import annotations

from typing import Any


def with_normalization(
    model: Any,
    mean: list[float],
    std: list[float],
    tta_flip: bool = False,
    data_shape: tuple[int, int, int] | None = None,
) -> Any:
    """Wrap a trained model so it takes raw pixels (0..255) instead of DALI-normalized input.

    Training sees images normalized by the DALI pipeline; the registered model carries
    the same per-channel mean/std (and, with ``tta_flip``, the same flip test-time
    augmentation the evaluate stage scored), so a registry consumer needs nothing else.
    ``data_shape``: the dataset's (H, W, C) when the model takes another shape (a transfer
    base); the wrapper then takes the dataset's pixels and resizes / repeats gray as RGB
    as the DALI pipeline did (tasks/images/augment.py), before normalizing per model channel.
    """
    import keras
    import numpy as np

    variance = (np.asarray(std, dtype="float32") ** 2).tolist()
    model_shape = tuple(model.input_shape[1:])
    pixels = keras.Input(shape=tuple(data_shape or model_shape), name="pixels")
    x = _as_model_input(pixels, tuple(data_shape or model_shape), model_shape)
    x = keras.layers.Normalization(mean=mean, variance=variance, name="normalize")(x)
    logits = model(x)
    if tta_flip:
        mirrored = model(mirror_left_right(x, width=model.input_shape[2]))
        logits = keras.layers.Average(name="flip_tta")([logits, mirrored])
    return keras.Model(pixels, logits, name=f"{model.name}_raw_pixels")


def _as_model_input(
    pixels: Any, data_shape: tuple[int, int, int], model_shape: tuple[int, int, int]
) -> Any:
    """The DALI pipeline's resize and gray -> RGB in built-in layers (nothing when the
    shapes agree). Keras' bilinear Resizing (antialias off) is what DALI's linear resize
    without antialias computes, to 7.6e-4 px (tasks/images/augment.py `_to_model_input`)."""
    import keras

    x = pixels
    if data_shape[:2] != model_shape[:2]:
        height, width = model_shape[:2]
        x = keras.layers.Resizing(height, width, interpolation="bilinear", name="resize")(x)
    if (data_shape[2], model_shape[2]) == (1, 3):
        x = keras.layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])
    elif data_shape[2] != model_shape[2]:
        raise ValueError(
            f"the model takes {model_shape[2]} channels, the data has {data_shape[2]}: only "
            "1 (gray) -> 3 (RGB) is converted"
        )
    return x


def mirror_left_right(images: Any, width: int) -> Any:
    """Mirror NHWC images along W using only built-in layers.

    A Lambda or custom layer would make the registered model need this package (or
    unsafe deserialization) to load; a frozen anti-identity Dense applied along W is
    the same permutation, exact in float32, and loads anywhere Keras does.
    """
    import keras
    import numpy as np

    along_w = keras.layers.Permute((1, 3, 2), name="to_nhcw")(images)
    flip = keras.layers.Dense(width, use_bias=False, trainable=False, name="mirror")
    mirrored = flip(along_w)
    flip.set_weights([np.eye(width, dtype="float32")[::-1]])
    return keras.layers.Permute((1, 3, 2), name="to_nhwc")(mirrored)
