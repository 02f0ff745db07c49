"""The preprocess stage's image part: the per-channel mean/std in pixel units
(data/preprocess/norm_stats.json) and a grid of training samples drawn through the very
DALI pipeline training uses (reports/preprocess/augmented_samples.png). Augmentation
itself runs online in the train stage; no augmented image is ever stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig
from tasks.images import augment
from tasks.images.feeding import model_stats, resize_args
from tasks.prepared import load_meta, load_split
from tasks.training.device import resolve_device
from tasks.workspace import Workspace, write_json


def preprocess(
    cfg: PipelineConfig, ws: Workspace, data_dir: Path, report_dir: Path
) -> dict[str, Any]:
    meta = load_meta(ws.prepared)
    images, labels = load_split(ws.prepared, "train")
    stats = augment.channel_stats(images)
    count = min(cfg.preprocess.grid_samples, len(images))
    # The grid only illustrates; a fixed seed keeps it comparable across runs.
    shown = model_stats(cfg, stats)
    samples = augment.sample_augmented(
        images, shown, cfg.preprocess, count, seed=0, **resize_args(cfg, images.shape[1:])
    )
    augment.save_image_grid(
        samples,
        shown.mean,
        shown.std,
        report_dir / ws.augmented_grid.name,
        meta["class_names"],
        labels[:count],
    )
    write_json(data_dir / ws.norm_stats.name, stats._asdict())
    return {"preprocess.device": resolve_device(cfg.preprocess.device)}
