"""Reading a trained model file: the one way every stage and command loads a `.keras`."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from tasks.errors import ModelFileError


def load_model_file(path: Path) -> Any:
    """The Keras model in ``path`` for inference, loaded in Keras' safe mode.

    Safe mode refuses to deserialize code (a Lambda layer's Python function), so a
    crafted or tampered ``.keras`` file cannot run anything when a stage loads it; such a
    file, or one that is not a Keras model at all, stops the stage with its name.
    """
    import keras

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the train stage first (`dvc repro train`)")
    rebuild = "rebuild it with the train stage (`dvc repro train`)"
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" of a cut archive
        raise ModelFileError(
            f"{path} is not a .keras archive ({path.stat().st_size} bytes: truncated, or not "
            f"a Keras model file): {rebuild}"
        )
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # a crafted config fails Keras with TypeError, KeyError, ...
        if "safe_mode" in str(error):
            raise ModelFileError(
                f"{path} holds executable code (a Lambda layer with a Python function), "
                "which the pipeline never loads (Keras safe_mode): rebuild it with the train "
                "stage (`dvc repro train`) from the models in tasks/models/"
            ) from None
        said = (str(error).strip().splitlines() or [""])[0][:300]
        raise ModelFileError(
            f"{path} is not a loadable Keras model (corrupt, or its config names layers or "
            f"functions Keras does not build: {type(error).__name__}: {said}): {rebuild}"
        ) from None
