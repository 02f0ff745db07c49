"""Preprocess stage: normalization stats and a look at the DALI augmentation.

Augmentation itself runs online in the train stage (every epoch sees fresh crops and
flips, and no augmented image is ever stored). This stage computes what that needs,
the per-channel mean/std of the training images in pixel units, and draws a grid of
augmented training samples through the very pipeline training uses.
"""

from __future__ import annotations

from tasks import augment, data, tracking
from tasks.config import PipelineConfig
from tasks.workspace import Workspace, write_json


def run(cfg: PipelineConfig, ws: Workspace) -> augment.NormStats:
    """The stage as `dvc repro` and the Prefect flow call it."""
    import mlflow

    meta = data.load_meta(ws.prepared)
    images, labels = data.load_split(ws.prepared, "train")
    with tracking.stage_run(cfg, ws, "preprocess"):
        stats = augment.channel_stats(images)
        count = min(cfg.preprocess.grid_samples, len(images))
        # The grid only illustrates; a fixed seed keeps it comparable across runs.
        samples = augment.sample_augmented(images, stats, cfg.preprocess, count, seed=0)
        augment.save_image_grid(
            samples, stats.mean, stats.std, ws.augmented_grid, meta["class_names"], labels[:count]
        )
        write_json(ws.norm_stats, stats._asdict())
        mlflow.set_tag("preprocess.device", augment.resolve_device(cfg.preprocess.device))
        mlflow.log_artifact(str(ws.norm_stats), artifact_path="preprocess")
        mlflow.log_artifact(str(ws.augmented_grid), artifact_path="preprocess")
    return stats
