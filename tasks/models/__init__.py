"""Model builders, looked up by `model.name` in params.yaml: the one place a model family
plugs in (the CNNs here, transfer learning in transfer.py, the language model in
language.py).

Builders take the input shape and output count from the prepared data's metadata, so
the same model name works for CIFAR-10 (32x32x3) and MNIST-family data (28x28x1).
They use only keras.layers, so the models run on any Keras 3 backend.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import ModelFileError

if TYPE_CHECKING:
    from tasks.config import ModelConfig, PipelineConfig


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
    input_shape: tuple[int, int, int], num_classes: int, widths: tuple[int, ...] = (64, 256, 256)
) -> Any:
    """A VGG-style net with batch norm built for time-to-accuracy, after airbench94.

    A small 3x3 stem, then one group per width: conv, 2x2 max-pool, BN, GELU, conv, BN,
    GELU; global max-pool and a bias-free linear head. airbench94 uses widths 64/256/256
    on CIFAR-10 on a GPU; narrower widths trade accuracy for CPU speed. BN momentum 0.9
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
        return layers.Activation("gelu")(x)

    inputs = keras.Input(shape=input_shape)
    x = conv_bn_gelu(inputs, max(24, widths[0] // 2), pool=False)
    for width in widths:
        x = conv_bn_gelu(x, width, pool=True)
        x = conv_bn_gelu(x, width, pool=False)
    x = layers.GlobalMaxPooling2D()(x)
    outputs = layers.Dense(num_classes, use_bias=False, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="fast_cnn")


def transfer(input_shape: tuple[int, int, int], num_classes: int, cfg: ModelConfig) -> Any:
    """A keras.applications base (model.base) with a new head, for raw pixels at
    model.input_size (tasks/models/transfer.py), its weights from model.weights (checked
    before any work by `check_weights`)."""
    # Not `from tasks.models import transfer`: that finds this function, not the module,
    # until something else has imported tasks.models.transfer.
    from tasks.models.transfer import resolve_weights, transfer_model

    return transfer_model(
        (cfg.input_size, cfg.input_size, 3),
        num_classes,
        base=cfg.base,
        head=cfg.head,
        dropout=cfg.dropout,
        weights=resolve_weights(cfg.weights, cfg.base, image_size=cfg.input_size),
    )


def lstm_lm(input_shape: tuple[int], vocab_size: int, cfg: ModelConfig) -> Any:
    """The seed's LSTM language model (tasks/models/language.py)."""
    from tasks.models.language import lstm_language_model

    return lstm_language_model(
        input_shape[0],
        vocab_size,
        embedding_dim=cfg.embedding_dim,
        units=cfg.units,
        layers=cfg.layers,
        dropout=cfg.dropout,
    )


MODEL_BUILDERS: dict[str, Callable[..., Any]] = {
    "seed_cnn": lambda shape, outputs, cfg: seed_cnn(shape, outputs),
    "fast_cnn": lambda shape, outputs, cfg: fast_cnn(shape, outputs, tuple(cfg.widths)),
    "transfer": transfer,
    "lstm_lm": lstm_lm,
}
# What each model reads: the data stage's modality (tasks.config.modality).
MODEL_MODALITIES = {
    "seed_cnn": "image",
    "fast_cnn": "image",
    "transfer": "image",
    "lstm_lm": "text",
}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], outputs: int) -> Any:
    """``outputs``: the number of classes (images) or the vocabulary size (text)."""
    return MODEL_BUILDERS[cfg.name](tuple(input_shape), outputs, cfg)


def image_size_key(cfg: Any) -> str:
    """What a user changes to get bigger images: the synthetic size, else the dataset."""
    if cfg.data.source == "synthetic":
        return f"data.synthetic.image_size={cfg.data.synthetic.image_size}"
    return f"data.name={cfg.data.name} (its images)"


TOO_SMALL = "output size would be zero or negative"  # Keras' words for a spent input


def check_input_fits(
    cfg: ModelConfig, input_shape: tuple[int, ...], outputs: int, key: str
) -> None:
    """Refuse, before training, an image the CNN's convolutions and pooling reduce to
    nothing, naming ``key`` and the smallest size this model takes (found by building it,
    so it follows the architecture, not a fixed number). Transfer models resize to
    ``model.input_size`` (>= 32) and text models read no images: nothing to check."""
    from tasks.config import ConfigError

    if cfg.name not in ("seed_cnn", "fast_cnn"):
        return

    def fits(size: int) -> bool:
        try:
            build_model(cfg, (size, size, *input_shape[2:]), outputs)
        except ValueError as error:
            if TOO_SMALL not in str(error):
                raise
            return False
        return True

    size = input_shape[0]
    if fits(size):
        return
    smallest = next((bigger for bigger in range(size + 1, 1025) if fits(bigger)), None)
    raise ConfigError(
        f"{key} is too small for model.name {cfg.name!r}: its convolutions and pooling "
        f"reduce a {size}x{size} image to nothing; it needs at least {smallest}x{smallest} "
        "(raise the image size, or choose another model.name)"
    )


@dataclass(frozen=True)
class Phase:
    """A stretch of training with one set of trainable layers and one learning rate.

    Epochs are numbered on across phases (``first_epoch`` to ``end_epoch``, exclusive),
    so MLflow and history.csv show one continuous curve.
    """

    name: str
    index: int
    first_epoch: int
    end_epoch: int
    learning_rate: float


def training_phases(cfg: PipelineConfig) -> list[Phase]:
    """One phase for every model but transfer, which trains as Keras's transfer-learning
    guide does: the head on a frozen base, then the top model.unfreeze base layers too at
    train.finetune_learning_rate. A phase of 0 epochs is left out. A transfer model with
    model.weights none (the from-scratch baseline) trains every layer in one phase of
    train.frozen_epochs + train.finetune_epochs epochs at train.learning_rate."""
    train = cfg.train
    if cfg.model.name != "transfer":
        return [Phase("train", 0, 0, train.epochs, train.learning_rate)]
    if cfg.model.weights == "none":  # the same architecture from scratch: nothing to freeze
        epochs = train.frozen_epochs + train.finetune_epochs
        return [Phase("scratch", 0, 0, epochs, train.learning_rate)]
    plan = [
        ("frozen", train.frozen_epochs, train.learning_rate),
        ("finetune", train.finetune_epochs, train.finetune_learning_rate),
    ]
    phases, epoch = [], 0
    for index, (name, epochs, rate) in enumerate(plan):
        if epochs:
            phases.append(Phase(name, index, epoch, epoch + epochs, rate))
            epoch += epochs
    return phases


def enter_phase(model: Any, phase: Phase, cfg: ModelConfig) -> None:
    """Set which layers train in ``phase`` (the caller compiles afterwards, as Keras needs)."""
    if cfg.name == "transfer":
        from tasks.models.transfer import set_phase

        set_phase(model, phase.name, cfg.unfreeze)


def input_shape_for(cfg: ModelConfig, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The image shape the model reads: a transfer base's (input_size, input_size, 3), else
    the data's own (the DALI pipeline and the registered model resize to it)."""
    if cfg.name == "transfer":
        return (cfg.input_size, cfg.input_size, 3)
    return tuple(data_shape)


def normalizes_itself(cfg: ModelConfig) -> bool:
    """True when raw pixels go in: a transfer base's preprocess_input is in the model."""
    return cfg.name == "transfer"


def check_weights(cfg: ModelConfig) -> None:
    """Fail before any work when the configured pretrained weights cannot be had."""
    if cfg.name == "transfer":
        from tasks.models.transfer import check_weights as check_transfer_weights

        check_transfer_weights(cfg.weights, cfg.base, image_size=cfg.input_size)


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


def load_model_file(path: Path) -> Any:
    """The Keras model in ``path`` for inference, loaded in Keras' safe mode.

    Safe mode refuses to deserialize code (a Lambda layer's Python function), so a
    crafted or tampered ``.keras`` file cannot run anything when a stage loads it; such a
    file, or one that is not a Keras model at all, stops the stage with its name.
    """
    import keras

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the train stage first (`dvc repro train`)")
    rebuild = "rebuild it with the train stage (`dvc repro train`)"
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" of a cut archive
        raise ModelFileError(
            f"{path} is not a .keras archive ({path.stat().st_size} bytes: truncated, or not "
            f"a Keras model file): {rebuild}"
        )
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # a crafted config fails Keras with TypeError, KeyError, ...
        if "safe_mode" in str(error):
            raise ModelFileError(
                f"{path} holds executable code (a Lambda layer with a Python function), "
                "which the pipeline never loads (Keras safe_mode): rebuild it with the train "
                "stage (`dvc repro train`) from the models in tasks/models/"
            ) from None
        said = (str(error).strip().splitlines() or [""])[0][:300]
        raise ModelFileError(
            f"{path} is not a loadable Keras model (corrupt, or its config names layers or "
            f"functions Keras does not build: {type(error).__name__}: {said}): {rebuild}"
        ) from None
