"""The export stage's image part: the pixels parity is checked on and the training
images int8 quantization calibrates with."""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.config import PipelineConfig
from tasks.prepared import load_split
from tasks.serving.formats import REPRESENTATIVE_IMAGES
from tasks.workspace import Workspace


def export_samples(cfg: PipelineConfig, ws: Workspace) -> tuple[Any, Any, Any]:
    """(test inputs, their targets, training inputs for int8 ranges)."""
    count = cfg.export.parity_samples
    test_images, test_labels = load_split(ws.prepared, "test")
    train_images, _ = load_split(ws.prepared, "train")
    pixels = np.asarray(test_images[:count], dtype="float32")
    return pixels, test_labels[:count], train_images[:REPRESENTATIVE_IMAGES]
