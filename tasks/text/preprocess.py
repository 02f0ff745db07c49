"""The preprocess stage's text part: the training tokens' frequencies, the unigram
baseline the language model must beat (data/preprocess/unigram.json), and training
examples decoded back to text (reports/preprocess/sample_windows.txt). DALI has no text
operators; text is tokenized by Keras' TextVectorization in the data stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig
from tasks.prepared import load_meta
from tasks.text import metrics, windows
from tasks.text.corpus import decode, load_tokens, load_vocabulary
from tasks.workspace import Workspace, write_json

SAMPLE_WINDOWS = 16  # training examples shown, decoded, in reports/preprocess/


def preprocess(
    cfg: PipelineConfig, ws: Workspace, data_dir: Path, report_dir: Path
) -> dict[str, Any]:
    meta = load_meta(ws.prepared)
    train = load_tokens(ws.prepared, "train")
    vocabulary = load_vocabulary(ws.prepared)
    unigram = metrics.unigram_probabilities(train, meta["vocab_size"])
    write_json(data_dir / ws.unigram.name, {"probabilities": unigram.tolist()})
    length = cfg.data.text.sequence_length
    windows.check_length({"training": train}, length)
    contexts, targets = windows.windows(train, length)
    lines = [
        f"{decode(vocabulary, context, meta['level'])!r} -> {vocabulary[target]!r}"
        for context, target in zip(contexts[:SAMPLE_WINDOWS], targets, strict=False)
    ]
    (report_dir / ws.sample_windows.name).write_text("\n".join(lines) + "\n")
    return {"preprocess.device": "cpu (tf.data: DALI has no text operators)"}
