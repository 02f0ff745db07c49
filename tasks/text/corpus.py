"""Text in data/prepared/ as the stages after the data stage read it (tasks/text/data.py
writes it), and the tokenizer settings training and the served model share.

data/prepared/ holds ``{train,val,test}.npz`` with ``tokens`` (int32, one stream per
split), ``vocabulary.json`` (token strings, index = id; 0 is padding, 1 is [UNK]) and
meta.json with ``"modality": "text"``. Windows of ``data.text.sequence_length`` tokens are
cut online by the train and evaluate stages (tasks/text/windows.py), so the stored data
stays one id per token.

Tokens come from Keras' TextVectorization (word level: lower-cased, punctuation
stripped, split on whitespace; character level: lower-cased, every character a token),
the layer the served model reuses, so training and serving tokenize alike. DALI has no
text operators: text preprocessing is plain TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.prepared import load_arrays, prepared_file

RESERVED_TOKENS = 2  # TextVectorization's id 0 (padding) and id 1 ([UNK])


def tokenizer_options(level: str) -> dict[str, str]:
    """TextVectorization's settings for ``data.text.level`` (also the served model's)."""
    if level == "word":
        return {"standardize": "lower_and_strip_punctuation", "split": "whitespace"}
    return {"standardize": "lower", "split": "character"}


def load_tokens(prepared_dir: Path, split: str) -> np.ndarray:
    """One split's token ids (int32), as `write_prepared_text` stored them."""
    (tokens,) = load_arrays(prepared_dir, split, "tokens")
    return tokens


def load_vocabulary(prepared_dir: Path) -> list[str]:
    return [str(t) for t in json.loads(prepared_file(prepared_dir, "vocabulary.json").read_text())]


def tokenizer_config(level: str) -> dict[str, str]:
    """The served model's tokenizer settings (the same TextVectorization as training's)
    and how its tokens join back into text."""
    options = tokenizer_options(level)
    return {
        "standardize": options["standardize"],
        "split": options["split"],
        "joiner": " " if level == "word" else "",
    }


def decode(vocabulary: list[str], ids: np.ndarray, level: str) -> str:
    return tokenizer_config(level)["joiner"].join(vocabulary[int(i)] for i in ids)
