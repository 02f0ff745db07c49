"""Keras models from `model.name`: each family's builder (tasks/models/catalog.py says what
the family is), and the checks that need a model built.

Builders take the input shape and output count from the prepared data's metadata, so
the same model name works for CIFAR-10 (32x32x3) and MNIST-family data (28x28x1). They
use only keras.layers, so the models run on any Keras 3 backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tasks.models.catalog import Phase, family
from tasks.models.cnn import fast_cnn, seed_cnn

if TYPE_CHECKING:
    from tasks.config import ModelConfig


def transfer(input_shape: tuple[int, int, int], num_classes: int, cfg: ModelConfig) -> Any:
    """A keras.applications base (model.base) with a new head, for raw pixels at
    model.input_size (tasks/models/transfer.py), its weights from model.weights (checked
    before any work by `check_weights`)."""
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
    """The seed's LSTM language model (tasks/models/lstm.py)."""
    from tasks.models.lstm import lstm_language_model

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
    "fast_cnn": lambda shape, outputs, cfg: fast_cnn(
        shape, outputs, tuple(cfg.widths), cfg.activation
    ),
    "transfer": transfer,
    "lstm_lm": lstm_lm,
}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], outputs: int) -> Any:
    """``outputs``: the number of classes (images) or the vocabulary size (text)."""
    return MODEL_BUILDERS[cfg.name](tuple(input_shape), outputs, cfg)


TOO_SMALL = "output size would be zero or negative"  # Keras' words for a spent input


def check_input_fits(
    cfg: ModelConfig, input_shape: tuple[int, ...], outputs: int, key: str
) -> None:
    """Refuse, before training, an image the CNN's convolutions and pooling reduce to
    nothing, naming ``key`` and the smallest size this model takes (found by building it,
    so it follows the architecture, not a fixed number). Transfer models resize to
    ``model.input_size`` (>= 32) and text models read no images: nothing to check."""
    from tasks.config import ConfigError

    if family(cfg.name).fixed_input or family(cfg.name).modality != "image":
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


def enter_phase(model: Any, phase: Phase, cfg: ModelConfig) -> None:
    """Set which layers train in ``phase`` (the caller compiles afterwards, as Keras needs)."""
    if family(cfg.name).two_phases:
        from tasks.models.transfer import set_phase

        set_phase(model, phase.name, cfg.unfreeze)


def check_weights(cfg: ModelConfig) -> None:
    """Fail before any work when the configured pretrained weights cannot be had."""
    if cfg.name == "transfer":
        from tasks.models.transfer import check_weights as check_transfer_weights

        check_transfer_weights(cfg.weights, cfg.base, image_size=cfg.input_size)
