"""What a modality's stage parts hand back to their stages (the contract of
tasks/images/ and tasks/text/).

A modality (images: uint8 NHWC arrays, DALI augmentation, classifiers; text: token
streams, next-token models) is a package with one module per stage that differs by
modality, each with one function the stage calls (tasks/stages/ picks the package from
``data.source``, the only place that does):

- ``data.prepare(cfg, ws) -> meta``: write data/prepared/ (tasks/prepared.py) as a whole;
- ``preprocess.preprocess(cfg, ws, data_dir, report_dir) -> tags``: what training derives
  from the training split, and samples;
- ``train.training_data(cfg, ws, epoch) -> TrainingData``: batches for fit();
- ``evaluate.evaluate(cfg, ws, model, out_dir) -> headline metrics``;
- ``register.served_model(cfg, ws, scratch) -> ServedModel``: the version's code and files;
- ``export.export_samples(cfg, ws) -> (test inputs, targets, training inputs)``.

A stage imports only its own part, so `dvc repro` reruns a stage only for code it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from tasks.training.distribute import Shard


@dataclass(frozen=True)
class TrainingData:
    """What the train stage fits on: a dataset per input pipeline (`Shard`: one per
    replica or worker under tf.distribute, see tasks/training/distribute.py); the ``epoch`` a
    tf.Variable a callback sets makes the training order a function of (seed, epoch)."""

    train: Callable[[Shard], Any]  # tf.data.Dataset of (inputs, int32 targets)
    val: Callable[[Shard], Any]
    input_shape: tuple[int, ...]
    outputs: int  # classes, or the vocabulary size
    train_examples: int


@dataclass(frozen=True)
class ServedModel:
    """How a version is logged: MLflow model code, its artifacts and config, an input
    example for the signature, and what the registered name is bound to."""

    code: Path
    artifacts: dict[str, Path]
    model_config: dict[str, Any]
    input_example: Any
    binding: dict[str, str]
    output_schema: Any = None  # mlflow.types.Schema of what predict() answers
    interface: str = ""  # input and output in a sentence each, for the model's description
    classes: str = ""  # the label space in words, for the model's description
    params: dict[str, Any] | None = None  # inference params in the signature
    # accuracy(version) of a registered version on this run's test data
    reevaluate: Callable[[str], float] | None = field(default=None, compare=False)
