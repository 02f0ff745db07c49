"""Read MNIST-family datasets stored as IDX files (MNIST, Fashion-MNIST, KMNIST, ...).

IDX is the format these datasets are published in: a 4-byte magic number (two zero
bytes, a type code, the number of dimensions), one big-endian uint32 per dimension,
then the raw values. Debian's `dataset-fashion-mnist` package installs the official
Fashion-MNIST files this way under /usr/share/datasets/fashion-mnist/, so real data is
available on machines that cannot download anything. Every check names the file and
what is wrong with it, before anything is written.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from tasks.errors import DataFileError

UINT8_TYPE = 0x08  # the only IDX element type MNIST-family files use
# split -> (images file stem, labels file stem), the names the datasets are published under
FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class IdxFormatError(DataFileError):
    """An IDX file is missing, truncated, of the wrong kind, or disagrees with its partner."""


def find_file(directory: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``directory``; raw files win when both exist."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise IdxFormatError(
        f"{directory / stem}[.gz] not found: data.idx_dir must hold the four MNIST-format "
        f"files ({', '.join(s for pair in FILE_STEMS.values() for s in pair)}, gzipped or "
        "not); for Fashion-MNIST on Debian: apt-get install dataset-fashion-mnist"
    )


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse one uint8 IDX file, checking its header against ``expected_ndim`` and its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:  # corrupt or truncated gzip stream
        raise IdxFormatError(f"{path}: cannot be read as IDX ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()!r})")
    if raw[2] != UINT8_TYPE:
        raise IdxFormatError(f"{path}: element type 0x{raw[2]:02x}, expected 0x08 (uint8)")
    ndim = raw[3]
    if ndim != expected_ndim:
        kind = {1: "a labels file", 3: "an images file"}.get(ndim, f"{ndim}-dimensional")
        want = {1: "a labels file", 3: "an images file"}[expected_ndim]
        raise IdxFormatError(f"{path}: is {kind} ({ndim} dimensions), expected {want}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    found = len(raw) - header
    if found != expected:
        raise IdxFormatError(
            f"{path}: header promises {dims} = {expected} bytes of data, file has {found} "
            f"({'truncated' if found < expected else 'trailing bytes'})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(directory: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x H x W x 1 images, int64 labels) of one split, cross-checked."""
    images_stem, labels_stem = FILE_STEMS[split]
    images_path, labels_path = find_file(directory, images_stem), find_file(directory, labels_stem)
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= num_classes:
        raise IdxFormatError(
            f"{labels_path}: label {labels.max()} is out of range for {num_classes} classes"
        )
    return images[..., np.newaxis], labels


def load_idx_dataset(
    directory: Path, class_names: list[str] | None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """Train and test splits plus class names from an MNIST-format directory.

    IDX files carry no class names: pass them (e.g. from TFDS metadata), or get "0".."K-1"
    with K taken from the largest training label.
    """
    if not directory.is_dir():
        raise IdxFormatError(
            f"data.idx_dir {directory} is not a directory; for Fashion-MNIST on Debian: "
            "apt-get install dataset-fashion-mnist (it installs to "
            "/usr/share/datasets/fashion-mnist)"
        )
    if class_names is None:
        labels = read_idx(find_file(directory, FILE_STEMS["train"][1]), expected_ndim=1)
        class_names = [str(i) for i in range(int(labels.max(initial=0)) + 1)]
    train = load_split(directory, "train", len(class_names))
    test = load_split(directory, "test", len(class_names))
    if train[0].shape[1:] != test[0].shape[1:]:
        raise IdxFormatError(
            f"{directory}: train images are {train[0].shape[1:3]}, test images {test[0].shape[1:3]}"
        )
    return train, test, class_names
