"""The data stage's image part: uint8 train/val/test arrays and their metadata in
data/prepared/ (tasks/prepared.py), from TFDS, IDX files or synthetic patterns.

The pure core (`make_synthetic`, `load_tfds`, `split_train_val`, `prepare_dataset`) returns
arrays; the shell (`write_prepared`, `load_split`, `load_meta`) owns the files. Every later
stage reads only data/prepared/, so the contract is fixed: ``{train,val,test}.npz`` hold
``images`` (uint8, N x H x W x C, always 4-D) and ``labels`` (int64, N), and ``meta.json``
names the dataset, its source, class names, image shape and split sizes.

Images stay uint8 on purpose: preprocessing (DALI) normalizes and augments online, so the
stored data is 4x smaller than float32 and never holds augmented copies.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import ConfigError, DataConfig, PipelineConfig, SyntheticConfig, dataset_identity
from tasks.errors import DataFileError, DataUnavailableError, dns_error
from tasks.images import idx
from tasks.prepared import SPLITS, Split
from tasks.workspace import Workspace, atomic_dir

# Shown when a name is not a TFDS dataset; any TFDS dataset with an `image` and a
# ClassLabel `label` feature and train/test splits works, these are the usual ones.
KNOWN_IMAGE_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn_cropped", "kmnist")
OFFLINE_SMOKE_COMMAND = "python -m flows.pipeline data.source=synthetic"
_READ_BATCH = 8192  # images per TFDS read; 8192 CIFAR images are 25 MB


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays is elementwise, not a bool
class Dataset:
    """The three splits of one image-classification dataset, as stored on disk."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        # Fail here, at the producer, rather than deep inside a later stage.
        shapes = set()
        for split in SPLITS:
            images, labels = self.split(split)
            _check_split(split, images, labels, len(self.class_names))
            shapes.add(images.shape[1:])
        if len(shapes) != 1:
            raise ValueError(f"splits disagree on image shape: {sorted(shapes)}")

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def counts(self) -> dict[str, int]:
        return {split: int(len(self.split(split)[1])) for split in SPLITS}


def _check_split(split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{split} images must be uint8 NHWC, got {images.dtype} {images.shape}")
    if labels.dtype != np.int64 or labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{split} labels must be int64 of shape ({len(images)},), "
            f"got {labels.dtype} {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{split} labels fall outside [0, {num_classes})")


# --------------------------------------------------------------------------- synthetic

# Pixel intensities below are in [0, 1] units (x255 when stored as uint8).
_PATTERN_GRID = 4  # class patterns and clutter are bilinear upsamplings of a 4x4 grid: smooth
_CLASS_CONTRAST = 0.5  # peak-to-peak range of a class pattern around mid-grey
_CLUTTER_WEIGHT = 0.5  # per-example smooth clutter as strong as the pattern: no per-pixel shortcut
_MAX_SHIFT = 3  # pixels; random translation, so position alone does not identify the class


def _upsample_matrix(grid: int, size: int) -> np.ndarray:
    """(size, grid) bilinear interpolation weights; W @ g @ W.T resizes a grid x grid map."""
    position = np.linspace(0.0, grid - 1.0, size)
    low = np.minimum(np.floor(position).astype(int), grid - 2)
    frac = position - low
    weights = np.zeros((size, grid))
    weights[np.arange(size), low] = 1.0 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


_SYNTHETIC_CHUNK = 2048  # examples generated at a time (~50 MB of float64 at 32x32x3)


def _smooth_fields(rng: np.random.Generator, count: int, size: int, channels: int) -> np.ndarray:
    """``count`` random smooth colour fields, (count, size, size, channels), values in [0, 1]."""
    grid = rng.random((count, channels, _PATTERN_GRID, _PATTERN_GRID))
    weights = _upsample_matrix(_PATTERN_GRID, size)
    return (weights @ grid @ weights.T).transpose(0, 2, 3, 1)


def make_synthetic(cfg: SyntheticConfig, seed: int) -> tuple[Split, Split, list[str]]:
    """A learnable, CIFAR-shaped stand-in for offline runs and tests: (train, test, class_names).

    Each class owns a fixed smooth colour pattern; an example is its class pattern blended
    with an equally strong random smooth "clutter" field, shifted by up to a few pixels, plus
    Gaussian pixel noise of std ``cfg.noise``. Clutter and shift keep it from being solvable
    by per-pixel averaging alone; a small CNN still beats chance within an epoch.
    The same seed gives byte-identical arrays; classes are balanced (sizes differ by <= 1).
    """
    patterns_seed, train_seed, test_seed = np.random.SeedSequence(seed).spawn(3)
    # Patterns are drawn larger than the image so a shift crops real content, no wrap-around.
    padded = cfg.image_size + 2 * _MAX_SHIFT
    patterns = _smooth_fields(
        np.random.default_rng(patterns_seed), cfg.num_classes, padded, cfg.channels
    )
    spread = np.ptp(patterns, axis=(1, 2, 3), keepdims=True).clip(min=1e-6)
    patterns = 0.5 + _CLASS_CONTRAST * (patterns - 0.5) / spread  # equal contrast per class
    train = _synthetic_examples(np.random.default_rng(train_seed), patterns, cfg, cfg.train_size)
    test = _synthetic_examples(np.random.default_rng(test_seed), patterns, cfg, cfg.test_size)
    return train, test, [f"class_{k}" for k in range(cfg.num_classes)]


def _synthetic_examples(
    rng: np.random.Generator, patterns: np.ndarray, cfg: SyntheticConfig, count: int
) -> Split:
    """``count`` examples, built _SYNTHETIC_CHUNK at a time into one uint8 array: the
    float64 intermediates (several times the images' size) never exist for all at once,
    so peak memory stays near the uint8 result. Each chunk draws from its own child
    generator, so the result depends on the seed and the chunk size only."""
    size = cfg.image_size
    labels = rng.permutation(np.arange(count, dtype=np.int64) % cfg.num_classes)
    offsets = rng.integers(0, 2 * _MAX_SHIFT + 1, size=(count, 2))
    images = np.empty((count, size, size, cfg.channels), dtype=np.uint8)
    starts = range(0, count, _SYNTHETIC_CHUNK)
    for start, chunk_rng in zip(starts, rng.spawn(len(starts)), strict=True):
        part = slice(start, start + _SYNTHETIC_CHUNK)
        rows = offsets[part, 0, None] + np.arange(size)  # row indices into the pattern
        cols = offsets[part, 1, None] + np.arange(size)
        shifted = patterns[labels[part, None, None], rows[:, :, None], cols[:, None, :]]
        clutter = _smooth_fields(chunk_rng, len(shifted), size, cfg.channels)
        pixels = (1.0 - _CLUTTER_WEIGHT) * shifted + _CLUTTER_WEIGHT * clutter
        pixels += chunk_rng.normal(0.0, cfg.noise, size=pixels.shape)
        images[part] = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0)
    return images, labels


# --------------------------------------------------------------------------------- tfds


def load_tfds(name: str, data_dir: Path, manual_dir: Path) -> tuple[Split, Split, list[str]]:
    """Download (or reuse) a TFDS image-classification dataset: (train, test, class_names).

    TFDS caches prepared records in ``data_dir``. Offline, it takes the source archive from
    ``manual_dir`` when a file there has the URL's file name (checksum still verified).
    Works unchanged for any dataset with an ``image`` feature, a ClassLabel ``label`` and
    train/test splits (cifar10, cifar100, mnist, fashion_mnist, ...).
    """
    import tensorflow_datasets as tfds  # slow import (~5 s): only when TFDS is used

    try:
        builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    except tfds.core.DatasetNotFoundError as error:
        raise ValueError(
            f"data.name {name!r} is not a TFDS dataset; image-classification datasets that "
            f"work include {', '.join(KNOWN_IMAGE_DATASETS)}"
        ) from error
    _image_classification_features(name, builder.info.features)  # fail before downloading
    _download_and_prepare(builder, name, Path(manual_dir))
    # Only now: some datasets (cifar10, cifar100) read their class names while preparing.
    image_shape, class_names = _image_classification_features(name, builder.info.features)

    known_splits = set(builder.info.splits)  # empty only under tfds.testing.mock_data
    if known_splits and not {"train", "test"} <= known_splits:
        raise ValueError(
            f"TFDS dataset {name!r} needs 'train' and 'test' splits; it has {sorted(known_splits)}"
        )
    train, test = (_as_arrays(tfds, builder, split, image_shape) for split in ("train", "test"))
    return train, test, class_names


def tfds_class_names(name: str) -> list[str] | None:
    """Class names from TFDS metadata without downloading, or None if TFDS has none.

    For datasets on disk in another format (IDX): fashion_mnist's names are static
    metadata; for names TFDS does not know, the caller falls back to label numbers.
    """
    import tensorflow_datasets as tfds

    try:
        label = tfds.builder(name).info.features["label"]
    except (tfds.core.DatasetNotFoundError, KeyError):
        return None
    names = list(getattr(label, "names", []) or [])
    return None if names == [str(i) for i in range(len(names))] else names


def _image_classification_features(name: str, features: Any) -> tuple[tuple[int, ...], list[str]]:
    """Image shape and class names from the builder's metadata; raise if not that kind."""
    import tensorflow_datasets as tfds

    keys = set(features.keys())
    image = features["image"] if "image" in keys else None
    label = features["label"] if "label" in keys else None
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        raise ValueError(
            f"TFDS dataset {name!r} is not image classification: it needs an 'image' Image "
            f"feature and a 'label' ClassLabel feature, it has {sorted(keys)}"
        )
    if any(d is None for d in image.shape):
        raise ValueError(f"TFDS dataset {name!r} has variable-size images {image.shape}")
    return tuple(int(d) for d in image.shape), list(label.names)


def _as_arrays(tfds: Any, builder: Any, split: str, image_shape: tuple[int, ...]) -> Split:
    # Fixed-size batches, not batch_size=-1: that asks TFDS for one batch sized from the split
    # metadata, which tfds.testing.mock_data leaves empty (TF then aborts the process).
    images, labels = [], []
    for batch in tfds.as_numpy(builder.as_dataset(split=split, batch_size=_READ_BATCH)):
        images.append(np.asarray(batch["image"], dtype=np.uint8))
        labels.append(np.asarray(batch["label"], dtype=np.int64))
    if not labels:
        raise ValueError(f"TFDS split {builder.name}/{split} is empty")
    return np.concatenate(images).reshape(-1, *image_shape), np.concatenate(labels)


def _download_and_prepare(builder: Any, name: str, manual_dir: Path) -> None:
    """Run TFDS's download_and_prepare; offline, fail at once with one actionable error.

    TFDS retries an unreachable host 10 times with backoff (~3.5 minutes here) before
    giving up, so when a needed archive is missing from ``manual_dir`` the download hosts
    are resolved first: a DNS failure means offline, and waiting would only delay the error.
    """
    import requests  # a dependency of tensorflow_datasets
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import download_manager

    missing = {
        url: info.filename or _url_basename(url)
        for url, info in sorted((builder.url_infos or {}).items())
        if not (manual_dir / (info.filename or _url_basename(url))).exists()
    }
    if not builder.is_prepared():
        for url in missing:
            if unresolved := dns_error(url):
                raise _unavailable(name, missing, manual_dir) from unresolved
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
        )
    except (requests.ConnectionError, requests.Timeout, tfds.download.DownloadError) as error:
        raise _unavailable(name, missing, manual_dir) from error
    except download_manager.NonMatchingChecksumError as error:
        raise _checksum_mismatch(builder, name, manual_dir, error) from error


def _checksum_mismatch(
    builder: Any, name: str, manual_dir: Path, error: Exception
) -> DataFileError:
    """Name the archive in ``manual_dir`` whose size or sha256 is not the registered one.

    TFDS's own message spans several lines and points at its docs; the usual cause is a
    partial or wrong file put in the manual dir by hand, so that file is what to name.
    Hashing again costs a second read of the archive, on this failure path only.
    """
    from tensorflow_datasets.core.download import checksums

    for url, expected in sorted((builder.url_infos or {}).items()):
        path = manual_dir / (expected.filename or _url_basename(url))
        if not path.is_file():
            continue
        found = checksums.compute_url_info(path)
        if (found.size, found.checksum) != (expected.size, expected.checksum):
            return DataFileError(
                f"{path.resolve()} (in data.manual_dir) is not the archive TFDS expects for "
                f"{name!r}: {int(found.size)} bytes, sha256 {found.checksum[:12]}..., expected "
                f"{int(expected.size)} bytes, sha256 {expected.checksum[:12]}...; replace it "
                f"with a complete download of {url}, or delete it to let TFDS download it"
            )
    first_line = str(error).splitlines()[0]  # "Artifact <url>, downloaded to <path>, has ..."
    return DataFileError(f"TFDS dataset {name!r}: {first_line}; delete that file and rerun")


def _url_basename(url: str) -> str:
    return Path(urllib.parse.urlsplit(url).path).name


def _unavailable(name: str, missing: dict[str, str], manual_dir: Path) -> DataUnavailableError:
    urls = ", ".join(missing) or "(no source URL registered)"
    files = ", ".join(dict.fromkeys(missing.values())) or "the source archive"
    return DataUnavailableError(
        f"cannot download TFDS dataset {name!r} from {urls} (network unreachable?)\n"
        f"  to use a copy you have: put {files} in {manual_dir.resolve()} and rerun\n"
        f"  for an offline smoke run: {OFFLINE_SMOKE_COMMAND}, or with DVC "
        "`dvc exp run -S data.source=synthetic` (or set data.source: synthetic in params.yaml)"
    )


# ------------------------------------------------------------------------- split, prepare


def split_train_val(
    images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[Split, Split]:
    """Hold out ``val_fraction`` of each class for validation: (train, val), seeded.

    Stratified so that small or imbalanced datasets keep every class in both parts; the
    kept examples stay in their original order (the train stage shuffles every epoch).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        is_val[rng.permutation(members)[: round(val_fraction * len(members))]] = True
    if is_val.all() or not is_val.any():
        which = "no validation example" if not is_val.any() else "no training example"
        raise ConfigError(
            f"data.val_fraction={val_fraction} of the {len(labels)} training examples leaves "
            f"{which}: choose a fraction that holds out at least one per class"
        )
    return (images[~is_val], labels[~is_val]), (images[is_val], labels[is_val])


def select_classes(split: Split, classes: list[int]) -> Split:
    """The examples of ``classes`` only, relabelled 0..k-1 in the order given (data.classes),
    e.g. Fashion-MNIST's classes 5-9 as a 5-class task."""
    images, labels = split
    if max(classes) >= (known := int(labels.max()) + 1):
        raise DataFileError(
            f"data.classes {classes} names class {max(classes)}, but the dataset has classes "
            f"0..{known - 1}: fix data.classes"
        )
    relabel = np.full(known, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    keep = relabel[labels] >= 0
    return images[keep], relabel[labels[keep]]


def limit_labels(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> Split:
    """At most ``per_class`` training examples of each class (data.labels_per_class), drawn
    with ``seed`` and kept in their original order: learning from a few labels."""
    rng = np.random.default_rng([seed, per_class])
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep[rng.permutation(members)[:per_class]] = True
    return images[keep], labels[keep]


def prepare_dataset(cfg: DataConfig, workspace_root: Path) -> Dataset:
    """Load the configured source (synthetic or TFDS) and carve validation out of train."""
    workspace = Workspace(Path(workspace_root))
    if cfg.source == "synthetic":
        train, test, class_names = make_synthetic(cfg.synthetic, cfg.seed)
    elif cfg.source == "idx":
        train, test, class_names = idx.load_idx_dataset(
            workspace.resolve(cfg.idx_dir), tfds_class_names(cfg.name)
        )
    else:
        train, test, class_names = load_tfds(
            cfg.name, workspace.resolve(cfg.tfds_dir), workspace.resolve(cfg.manual_dir)
        )
    if cfg.classes:
        train, test = select_classes(train, cfg.classes), select_classes(test, cfg.classes)
        class_names = [class_names[c] for c in cfg.classes]
    (train_images, train_labels), (val_images, val_labels) = split_train_val(
        *train, cfg.val_fraction, cfg.seed
    )
    if cfg.labels_per_class:
        train_images, train_labels = limit_labels(
            train_images, train_labels, cfg.labels_per_class, cfg.seed
        )
    return Dataset(
        train_images=train_images,
        train_labels=train_labels,
        val_images=val_images,
        val_labels=val_labels,
        test_images=test[0],
        test_labels=test[1],
        class_names=tuple(class_names),
    )


# ---------------------------------------------------------------------------------- files


def build_meta(ds: Dataset, cfg: DataConfig) -> dict[str, Any]:
    """meta.json's content; later stages read class names and shapes from it, not params."""
    return {
        "modality": "image",
        # Synthetic data is not the configured TFDS dataset; do not label it as one.
        "dataset": dataset_identity(cfg.source, cfg.name, cfg.classes),
        "source": cfg.source,
        "class_names": list(ds.class_names),
        "num_classes": ds.num_classes,
        "image_shape": list(ds.image_shape),
        "counts": ds.counts,
    }


def write_prepared(ds: Dataset, out_dir: Path, cfg: DataConfig) -> dict[str, Any]:
    """Write the splits and meta.json to ``out_dir`` as a whole; return the meta.

    An error or crash mid-write leaves the previous ``out_dir`` intact, never half of one
    (workspace.atomic_dir).
    """
    meta = build_meta(ds, cfg)
    with atomic_dir(Path(out_dir)) as staging:
        for split in SPLITS:
            images, labels = ds.split(split)
            np.savez(staging / f"{split}.npz", images=images, labels=labels)  # uncompressed
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def prepare(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """data/prepared/ from the configured image source; meta.json's content."""
    return write_prepared(prepare_dataset(cfg.data, ws.root), ws.prepared, cfg.data)
