"""The register stage's text part: the version a registry consumer loads, a prompt-in
model (tasks/serving/text_model.py) with its vocabulary beside it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig, dataset_identity
from tasks.modality import ServedModel
from tasks.prepared import load_meta
from tasks.text.corpus import tokenizer_config
from tasks.workspace import Workspace

MODEL_CODE = Path(__file__).resolve().parents[1] / "serving" / "text_model.py"


def served_model(cfg: PipelineConfig, ws: Workspace, scratch: Path) -> ServedModel:
    import pandas as pd

    from tasks.serving.text_model import DEFAULT_PARAMS, KERAS_ARTIFACT, VOCABULARY_ARTIFACT

    meta = load_meta(ws.prepared)
    keras_file, vocabulary_file = scratch / "model.keras", scratch / "vocabulary.json"
    shutil.copyfile(ws.model_file, keras_file)  # token ids in: nothing to wrap
    shutil.copyfile(ws.prepared / "vocabulary.json", vocabulary_file)
    digest = hashlib.sha256(vocabulary_file.read_bytes()).hexdigest()[:16]
    return ServedModel(
        code=MODEL_CODE,
        artifacts={KERAS_ARTIFACT: keras_file, VOCABULARY_ARTIFACT: vocabulary_file},
        model_config=tokenizer_config(meta["level"]),
        input_example=pd.DataFrame({"prompt": list(cfg.evaluate.prompts)}),
        params=dict(DEFAULT_PARAMS),
        output_schema=output_schema(),
        interface=(
            "Input: a `prompt` column of strings. Output: one row per prompt: with "
            "`max_tokens` 0, the `next_token` and the `probabilities` of the `top_k` "
            "likeliest; with `max_tokens` > 0, the `text` generated after it. Params: "
            + ", ".join(f"`{key}` ({value})" for key, value in DEFAULT_PARAMS.items())
            + "."
        ),
        classes=f"a {meta['level']}-level vocabulary of {meta['vocab_size']} tokens",
        binding={
            "dataset": dataset_identity(cfg.data.source, cfg.data.name),
            "input_shape": json.dumps([-1]),  # one prompt per row
            "input_dtype": "string",
            # The vocabulary is the label space; a digest (it is too long for a tag).
            "classes": f"{meta['level']} vocabulary of {meta['vocab_size']}, sha256 {digest}",
        },
        # Versions tokenize with their own vocabularies: ids of one data version mean
        # nothing to a model of another, so the recorded accuracy is compared.
        reevaluate=None,
    )


def output_schema() -> Any:
    """What tasks/serving/text_model.py answers, one row per prompt: generated text, or
    the next token's probabilities (max_tokens 0)."""
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return Schema(
        [
            ColSpec(DataType.string, "prompt"),
            ColSpec(DataType.string, "text", required=False),
            ColSpec(DataType.string, "next_token", required=False),
            ColSpec(Map(DataType.double), "probabilities", required=False),
        ]
    )
