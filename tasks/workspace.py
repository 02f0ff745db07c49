"""Where each stage reads and writes, relative to one root directory.

dvc.yaml names the same paths; keeping them in one place lets the Prefect flow run
a whole pipeline in another root (a temp dir in tests) without touching the repo's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def prepared(self) -> Path:  # data stage: {train,val,test}.npz + meta.json
        return self.root / "data" / "prepared"

    @property
    def preprocessed(self) -> Path:  # preprocess stage: what training derives from train
        return self.root / "data" / "preprocess"

    @property
    def norm_stats(self) -> Path:  # images: per-channel mean/std
        return self.preprocessed / "norm_stats.json"

    @property
    def unigram(self) -> Path:  # text: training-token frequencies (the baseline)
        return self.preprocessed / "unigram.json"

    @property
    def model_file(self) -> Path:  # train stage
        return self.root / "models" / "model.keras"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def preprocess_reports(self) -> Path:  # preprocess stage: what the model is fed
        return self.reports / "preprocess"

    @property
    def augmented_grid(self) -> Path:  # images: augmented training samples
        return self.preprocess_reports / "augmented_samples.png"

    @property
    def sample_windows(self) -> Path:  # text: training examples, decoded
        return self.preprocess_reports / "sample_windows.txt"

    @property
    def history(self) -> Path:  # per-epoch metrics, a DVC plot
        return self.reports / "history.csv"

    @property
    def training_curves(self) -> Path:  # the same curves as a static PNG (offline plots)
        return self.reports / "training_curves.png"

    @property
    def metrics(self) -> Path:  # DVC metrics
        return self.reports / "metrics.json"

    @property
    def evaluation(self) -> Path:  # evaluate stage: everything beyond the headline metrics
        return self.reports / "evaluate"

    @property
    def per_class(self) -> Path:  # images: per-class precision/recall/F1/support
        return self.evaluation / "per_class.json"

    @property
    def predictions(self) -> Path:  # images: actual/predicted rows, a DVC confusion plot
        return self.evaluation / "predictions.csv"

    @property
    def confusion_png(self) -> Path:
        return self.evaluation / "confusion_matrix.png"

    @property
    def samples(self) -> Path:  # text: generated from fixed prompts, seeded
        return self.evaluation / "samples.txt"

    @property
    def registration(self) -> Path:
        return self.reports / "registration.json"

    @property
    def exports(self) -> Path:  # export stage: one file or directory per format
        return self.root / "exports"

    @property
    def parity(self) -> Path:  # export stage: each format against the Keras model
        return self.exports / "parity.json"

    @property
    def run_handle(self) -> Path:  # the open MLflow pipeline run, shared by stage processes
        return self.root / ".pipeline" / "mlflow_run.json"

    def resolve(self, relative: str) -> Path:
        """Resolve a params.yaml path (e.g. data.tfds_dir) against this root."""
        path = Path(relative)
        return path if path.is_absolute() else self.root / path


@contextmanager
def naming(target: Path) -> Iterator[None]:
    """An OSError without a file name (a write into an open file: disk full) raised while
    ``target`` is written gets ``target`` as its name, so the error can say where."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, os.strerror(error.errno), str(target)) from error
        raise


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it over ``target`` only on success.

    A crash or an exception leaves the previous ``target`` untouched and no partial file;
    a temp file a hard kill left behind is removed by the next write of ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with naming(target):
            yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp directory beside ``target``; it replaces ``target`` (two renames)
    only when the block succeeds. An error or a crash mid-write leaves the previous
    ``target`` intact, never half of one; a killed run's leftovers go at the next write."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the output gets the usual mode
    try:
        with naming(target):
            yield staging
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging``; restore the old one if that fails."""
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    had_previous = target.exists()
    if had_previous:
        os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        if had_previous:
            os.replace(retired, target)
        raise
    if had_previous:
        shutil.rmtree(retired)


def remove_stale_temps(target: Path) -> None:
    """Delete temp files and directories an interrupted write of ``target`` left beside it.

    One writer per work directory at a time (DVC's lock, a run directory per flow run),
    so any such leftover is stale.
    """
    for stale in target.parent.glob(f".{glob_escape(target.name)}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def finite_or_null(payload: Any) -> Any:
    """``payload`` with NaN and infinities as None: JSON has no such numbers, and a bare
    ``NaN`` (what Python's json writes) breaks every other reader (DVC, jq, browsers)."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return None
    if isinstance(payload, dict):
        return {key: finite_or_null(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_or_null(value) for value in payload]
    return payload


def write_json(target: Path, payload: Any) -> None:
    text = json.dumps(finite_or_null(payload), indent=2, sort_keys=True, allow_nan=False)
    with atomic_path(target) as tmp:
        tmp.write_text(text + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
