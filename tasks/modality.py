"""The one place the pipeline's stages differ by data modality: images or text.

Every stage keeps one implementation (its MLflow run, its files, its errors); what it
does with the data comes from a `Modality`, picked from ``data.source``:
`tasks.images.modality.ImageModality` (DALI-augmented uint8 images, classifiers) or
`tasks.text.modality.TextModality` (token streams, next-token models). A new modality is
a new class with these methods, not a branch in each stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tasks.config import PipelineConfig, modality

if TYPE_CHECKING:
    from collections.abc import Callable

    from tasks.training.distribute import Shard
    from tasks.workspace import Workspace


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
    params: dict[str, Any] | None = None  # inference params in the signature
    # accuracy(version) of a registered version on this run's test data
    reevaluate: Callable[[str], float] | None = field(default=None, compare=False)


class Modality(Protocol):
    name: str

    def prepare(self, cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
        """Data stage: write data/prepared/ (splits and meta.json) as a whole; return meta."""

    def preprocess(
        self, cfg: PipelineConfig, ws: Workspace, data_dir: Path, report_dir: Path
    ) -> dict[str, Any]:
        """Preprocess stage: what training derives from the training split, and samples."""

    def training_data(self, cfg: PipelineConfig, ws: Workspace, epoch: Any) -> TrainingData:
        """Train stage: batches for fit(), checked before any work."""

    def evaluate(
        self, cfg: PipelineConfig, ws: Workspace, model: Any, out_dir: Path
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Evaluate stage: write details into ``out_dir``; return the headline metrics
        (``accuracy`` among them: the number the registry compares) and every metric for
        MLflow."""

    def served_model(self, cfg: PipelineConfig, ws: Workspace, scratch: Path) -> ServedModel:
        """Register stage: the version's model code and files (written under ``scratch``)."""

    def export_samples(self, cfg: PipelineConfig, ws: Workspace) -> tuple[Any, Any, Any]:
        """Export stage: (test inputs, their targets, training inputs for int8 ranges)."""


def for_config(cfg: PipelineConfig) -> Modality:
    if modality(cfg.data.source) == "text":
        from tasks.text.modality import TextModality

        return TextModality()
    from tasks.images.modality import ImageModality

    return ImageModality()
