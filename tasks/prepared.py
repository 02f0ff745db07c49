"""data/prepared/: the contract between the data stage and every stage after it.

``{train,val,test}.npz`` and ``meta.json`` (its ``modality`` says which arrays the splits
hold: images uint8 NHWC and labels int64 for images, token ids for text). Every later
stage reads them only through these functions, so a missing or damaged file is named
with the command that rebuilds it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import DataFileError
from tasks.workspace import read_json

SPLITS = ("train", "val", "test")


Split = tuple[np.ndarray, np.ndarray]  # (images uint8 NHWC, labels int64 N)


MISSING_DATA_HINT = "run the data stage first: dvc repro data"


# DVC reruns a stage whose outputs changed, so the same command rebuilds a damaged file.
DAMAGED_DATA_HINT = "rebuild it with the data stage: dvc repro data"


def load_meta(prepared_dir: Path) -> dict[str, Any]:
    path = prepared_file(prepared_dir, "meta.json")
    try:
        return read_json(path)
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise DataFileError(f"{path} is not valid JSON ({error}); {DAMAGED_DATA_HINT}") from error


def load_split(prepared_dir: Path, split: str) -> Split:
    """(images uint8 NHWC, labels int64) of one split of a prepared directory."""
    images, labels = load_arrays(prepared_dir, split, "images", "labels")
    return images, labels


def load_arrays(prepared_dir: Path, split: str, *keys: str) -> tuple[np.ndarray, ...]:
    """The named arrays of one split's ``.npz`` (images and labels, or a text's tokens).

    A truncated or corrupt file fails here, naming it: numpy and zipfile would report
    "File is not a zip file" or a CRC error without saying which file.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    path = prepared_file(prepared_dir, f"{split}.npz")
    try:
        # Arrays are read lazily: a truncated member fails on access, inside the block.
        with np.load(path, allow_pickle=False) as arrays:
            return tuple(arrays[key] for key in keys)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise DataFileError(
            f"{path} cannot be read ({type(error).__name__}: {error}), truncated or corrupt? "
            f"{DAMAGED_DATA_HINT}"
        ) from error


def prepared_file(prepared_dir: Path, name: str) -> Path:
    path = Path(prepared_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {MISSING_DATA_HINT}")
    return path
