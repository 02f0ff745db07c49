"""The export stage's text part: the token windows parity is checked on and the
training windows int8 quantization calibrates with."""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.config import PipelineConfig
from tasks.serving.formats import REPRESENTATIVE_IMAGES
from tasks.text import windows
from tasks.text.corpus import load_tokens
from tasks.workspace import Workspace


def export_samples(cfg: PipelineConfig, ws: Workspace) -> tuple[Any, Any, Any]:
    """(test inputs, their targets, training inputs for int8 ranges)."""
    model_length = cfg.data.text.sequence_length
    contexts, targets = windows.windows(load_tokens(ws.prepared, "test"), model_length)
    train_contexts, _ = windows.windows(load_tokens(ws.prepared, "train"), model_length)
    count = cfg.export.parity_samples
    return (
        np.ascontiguousarray(contexts[:count], dtype=np.int32),
        targets[:count],
        np.ascontiguousarray(train_contexts[:REPRESENTATIVE_IMAGES], dtype=np.int32),
    )
