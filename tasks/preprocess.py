"""Preprocess stage: what training derives from the training split, and a look at what the
model is fed.

For images (tasks/images/modality.py): the per-channel mean/std in pixel units
(data/preprocess/norm_stats.json) and a grid of training samples drawn through the very
DALI pipeline training uses (reports/preprocess/augmented_samples.png); augmentation
itself runs online in the train stage, and no augmented image is ever stored. For text
(tasks/text/modality.py): the training tokens' frequencies, the unigram baseline the
language model must beat (data/preprocess/unigram.json), and training examples decoded
back to text (reports/preprocess/sample_windows.txt). DALI has no text operators; text
is tokenized by Keras' TextVectorization in the data stage.
"""

from __future__ import annotations

from typing import Any

from tasks import modality, tracking
from tasks.config import PipelineConfig
from tasks.workspace import Workspace, atomic_dir


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """The stage as `dvc repro` and the Prefect flow call it."""
    import mlflow

    with (
        tracking.stage_run(cfg, ws, "preprocess"),
        atomic_dir(ws.preprocessed) as data_dir,
        atomic_dir(ws.preprocess_reports) as report_dir,
    ):
        tags = modality.for_config(cfg).preprocess(cfg, ws, data_dir, report_dir)
        mlflow.set_tags(tags)
        mlflow.log_artifacts(str(data_dir), artifact_path="preprocess")
        mlflow.log_artifacts(str(report_dir), artifact_path="preprocess")
    return tags
