"""How an image model is fed, for every stage that feeds one: the shape it reads and
the statistics DALI normalizes with (the dataset's, or none for a model that normalizes
raw pixels itself)."""

from __future__ import annotations

from typing import Any, NamedTuple

from tasks.config import PipelineConfig
from tasks.models.catalog import input_shape_for, normalizes_itself
from tasks.workspace import Workspace, read_json


class NormStats(NamedTuple):
    """Per-channel mean and std in pixel units (0..255), as written to norm_stats.json."""

    mean: list[float]
    std: list[float]


def model_input_shape(cfg: PipelineConfig, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    return input_shape_for(cfg.model, data_shape)


def model_stats(cfg: PipelineConfig, stats: NormStats) -> NormStats:
    """What DALI normalizes with: the dataset's stats, or none (mean 0, std 1) for a model
    that normalizes raw pixels itself (a transfer base's preprocess_input)."""
    if normalizes_itself(cfg.model):
        return NormStats(mean=[0.0] * 3, std=[1.0] * 3)
    return stats


def resize_args(cfg: PipelineConfig, data_shape: tuple[int, ...]) -> dict[str, Any]:
    """DALI resizes (and expands gray to RGB) to the model's input inside the pipeline."""
    return {"input_shape": model_input_shape(cfg, data_shape)}


def dataset_stats(ws: Workspace) -> NormStats:
    """The preprocess stage's per-channel statistics of the training split."""
    return NormStats(**read_json(ws.norm_stats))
