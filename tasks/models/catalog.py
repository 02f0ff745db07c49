"""The model families `model.name` chooses among, as data: what each reads, how it is fed
and how it trains. No Keras here, so tasks/config.py validates a name (and the stages
decide how to feed a model) without importing it; the builders are in build.py.

A new family is a record below, a pydantic section in tasks/config.py and a builder in
build.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.config import PipelineConfig


@dataclass(frozen=True)
class Family:
    name: str
    modality: str  # the data it reads: "image" (uint8 NHWC) or "text" (token ids)
    raw_pixels: bool = False  # normalizes raw pixels itself (a transfer base)
    fixed_input: bool = False  # reads model.input_size x model.input_size RGB, any data
    two_phases: bool = False  # frozen base, then fine-tuning (train.frozen_epochs, ...)
    # Keys outside model.* that only this family reads: logged only for its runs.
    own_keys: tuple[str, ...] = ()


TRANSFER_TRAIN_KEYS = (
    "train.frozen_epochs",
    "train.finetune_epochs",
    "train.finetune_learning_rate",
)
GENERATION_KEYS = (
    "evaluate.prompts",
    "evaluate.temperatures",
    "evaluate.generate_tokens",
    "evaluate.seed",
)
FAMILIES = {
    "seed_cnn": Family("seed_cnn", "image"),
    "fast_cnn": Family("fast_cnn", "image"),
    "transfer": Family(
        "transfer",
        "image",
        raw_pixels=True,
        fixed_input=True,
        two_phases=True,
        own_keys=TRANSFER_TRAIN_KEYS,
    ),
    "lstm_lm": Family("lstm_lm", "text", own_keys=GENERATION_KEYS),
}
# Read by every family but these (the two-phase families count their own epochs).
NOT_READ_BY = {"train.epochs": ("transfer",), "evaluate.tta_flip": ("lstm_lm",)}


def family(name: str) -> Family:
    return FAMILIES[name]


def foreign_keys(name: str) -> set[str]:
    """Dotted params outside model.* that a ``name`` run does not read."""
    keys = {key for other in FAMILIES.values() if other.name != name for key in other.own_keys}
    return keys | {key for key, families in NOT_READ_BY.items() if name in families}


def image_size_key(cfg: Any) -> str:
    """What a user changes to get bigger images: the synthetic size, else the dataset."""
    if cfg.data.source == "synthetic":
        return f"data.synthetic.image_size={cfg.data.synthetic.image_size}"
    return f"data.name={cfg.data.name} (its images)"


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
    """One phase for every family but a two-phase one (transfer), which trains as Keras's
    transfer-learning guide does: the head on a frozen base, then the top model.unfreeze
    base layers too at train.finetune_learning_rate. A phase of 0 epochs is left out. With
    model.weights none (the from-scratch baseline) every layer trains in one phase of
    train.frozen_epochs + train.finetune_epochs epochs at train.learning_rate."""
    train = cfg.train
    if not family(cfg.model.name).two_phases:
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


def input_shape_for(model: Any, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The image shape the model reads: a fixed-input family's (input_size, input_size, 3),
    else the data's own (the DALI pipeline and the registered model resize to it)."""
    if family(model.name).fixed_input:
        return (model.input_size, model.input_size, 3)
    return tuple(data_shape)


def normalizes_itself(model: Any) -> bool:
    """True when raw pixels go in: a transfer base's preprocess_input is in the model."""
    return family(model.name).raw_pixels
