"""The train stage's text part: next-token windows cut online from the token streams."""

from __future__ import annotations

from typing import Any

from tasks.config import PipelineConfig
from tasks.modality import TrainingData
from tasks.prepared import load_meta
from tasks.text import windows
from tasks.text.corpus import load_tokens
from tasks.workspace import Workspace


def training_data(cfg: PipelineConfig, ws: Workspace, epoch: Any) -> TrainingData:
    meta = load_meta(ws.prepared)
    train = load_tokens(ws.prepared, "train")
    val = load_tokens(ws.prepared, "val")
    length = cfg.data.text.sequence_length
    windows.check_length({"training": train, "validation": val}, length)
    batch = cfg.train.batch_size
    return TrainingData(
        train=lambda shard: windows.windows_dataset(
            train, length, batch, train=True, seed=cfg.train.seed, epoch=epoch, shard=shard
        ),
        val=lambda shard: windows.windows_dataset(val, length, batch, train=False, shard=shard),
        input_shape=(length,),
        outputs=meta["vocab_size"],
        train_examples=windows.example_count(train, length),
    )
