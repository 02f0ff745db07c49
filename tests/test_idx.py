"""The IDX reader accepts MNIST-format files and rejects broken ones with a clear message."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from tasks.images.idx import IdxFormatError, load_idx_dataset, read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_dataset(directory: Path, n_train=20, n_test=10, gz=True, size=28) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gzipped_and_raw_files(tmp_path, gz):
    arrays = write_dataset(tmp_path, gz=gz)
    (train_x, train_y), (test_x, test_y), names = load_idx_dataset(tmp_path, None)
    assert train_x.shape == (20, 28, 28, 1) and train_x.dtype == np.uint8
    assert np.array_equal(train_x[..., 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(test_y, arrays["t10k-labels-idx1-ubyte"])
    assert train_y.dtype == np.int64
    assert names == [str(i) for i in range(10)]


def test_truncated_images_file_is_named(tmp_path):
    write_dataset(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        IdxFormatError, match=r"train-images-idx3-ubyte: header promises .*truncated"
    ):
        load_idx_dataset(tmp_path, None)


def test_truncated_gzip_stream_is_named(tmp_path):
    write_dataset(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(IdxFormatError, match="t10k-images-idx3-ubyte.gz: cannot be read"):
        load_idx_dataset(tmp_path, None)


def test_labels_file_in_place_of_images_is_named(tmp_path):
    write_dataset(tmp_path, gz=False)
    shutil.copy(tmp_path / "train-labels-idx1-ubyte", tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(IdxFormatError, match="is a labels file .* expected an images file"):
        load_idx_dataset(tmp_path, None)


def test_label_count_mismatch_is_named(tmp_path):
    write_dataset(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(9) % 10))
    with pytest.raises(IdxFormatError, match="holds 10 images but .* holds 9 labels"):
        load_idx_dataset(tmp_path, None)


def test_out_of_range_label_is_named(tmp_path):
    write_dataset(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(10, 12)))
    with pytest.raises(IdxFormatError, match="label 12 is out of range for 10 classes"):
        load_idx_dataset(tmp_path, [f"c{i}" for i in range(10)])


def test_bad_magic_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 10)
    with pytest.raises(IdxFormatError, match="not an IDX file"):
        read_idx(bad, expected_ndim=3)
    with pytest.raises(IdxFormatError, match="train-images-idx3-ubyte.*apt-get install"):
        load_idx_dataset(tmp_path, None)
    with pytest.raises(IdxFormatError, match="is not a directory"):
        load_idx_dataset(tmp_path / "nowhere", None)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_official_fashion_mnist_files():
    (train_x, train_y), (test_x, test_y), _ = load_idx_dataset(FASHION, None)
    assert train_x.shape == (60000, 28, 28, 1) and test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(train_y).tolist() == [6000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10
