"""Data stage: synthetic generator, TFDS loading (mocked, fake archive, offline), file contract."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks import prepared
from tasks.config import ConfigError, DataConfig, SyntheticConfig
from tasks.errors import DataUnavailableError
from tasks.images import data
from tasks.stages import data as data_stage
from tasks.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


@pytest.fixture(scope="module")
def data_cfg() -> DataConfig:
    """The real params.yaml data section, shrunk to a tiny synthetic set."""
    real = DataConfig.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())["data"])
    tiny = real.synthetic.model_copy(update={"train_size": 200, "test_size": 50})
    return real.model_copy(update={"source": "synthetic", "synthetic": tiny})


@pytest.fixture(scope="module")
def tfds():
    import tensorflow_datasets

    return tensorflow_datasets


def synthetic_cfg(**changes) -> SyntheticConfig:
    base = {"train_size": 200, "test_size": 50, "image_size": 32, "channels": 3}
    return SyntheticConfig(**{**base, "num_classes": 10, "noise": 0.35, **changes})


def nearest_mean_accuracy(cfg: SyntheticConfig, seed: int = 0) -> float:
    (images, labels), (test_images, test_labels), _ = data.make_synthetic(cfg, seed)
    flat = images.reshape(len(images), -1).astype(np.float32)
    test_flat = test_images.reshape(len(test_images), -1).astype(np.float32)
    means = np.stack([flat[labels == k].mean(axis=0) for k in range(cfg.num_classes)])
    distances = ((test_flat[:, None, :] - means[None]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == test_labels).mean())


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_and_names():
    (images, labels), (test_images, test_labels), names = data.make_synthetic(synthetic_cfg(), 0)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (200,) and labels.dtype == np.int64
    assert test_images.shape == (50, 32, 32, 3) and test_labels.shape == (50,)
    assert names == [f"class_{k}" for k in range(10)]
    assert images.std() > 20  # not a blank image: patterns and noise reach the pixels


def test_synthetic_grayscale_stays_4d():
    (images, _), _, _ = data.make_synthetic(synthetic_cfg(image_size=28, channels=1), 0)
    assert images.shape == (200, 28, 28, 1)


def test_synthetic_same_seed_same_bytes_other_seed_differs():
    first, second, other = (data.make_synthetic(synthetic_cfg(), s) for s in (3, 3, 4))
    for split in (0, 1):
        for array in (0, 1):
            assert first[split][array].tobytes() == second[split][array].tobytes()
    assert not np.array_equal(first[0][0], other[0][0])
    assert not np.array_equal(first[1][0], other[1][0])


def test_synthetic_classes_are_balanced():
    (_, labels), (_, test_labels), _ = data.make_synthetic(synthetic_cfg(train_size=205), 0)
    assert sorted(np.bincount(labels, minlength=10)) == [20] * 5 + [21] * 5
    assert np.bincount(test_labels, minlength=10).tolist() == [5] * 10
    assert len(set(labels[:10].tolist())) > 1  # shuffled, not sorted by class


def test_synthetic_is_learnable_but_not_trivial():
    # A nearest-class-mean classifier on raw pixels stands in for "a model can learn it":
    # far above chance (0.1), yet the per-example clutter and shift keep it imperfect.
    accuracy = nearest_mean_accuracy(synthetic_cfg(train_size=2000, test_size=500))
    assert 0.4 < accuracy < 0.95


def test_synthetic_noise_makes_it_harder():
    sizes = {"train_size": 1000, "test_size": 500}
    clean = nearest_mean_accuracy(synthetic_cfg(noise=0.0, **sizes))
    noisy = nearest_mean_accuracy(synthetic_cfg(noise=1.5, **sizes))
    assert noisy < clean - 0.1


# -------------------------------------------------------------------------------- split


def test_split_train_val_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4, dtype=np.int64), [10, 20, 30, 40])
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)  # pixel value = index
    (train_x, train_y), (val_x, val_y) = data.split_train_val(images, labels, 0.1, seed=0)
    assert np.bincount(val_y).tolist() == [1, 2, 3, 4]
    assert np.bincount(train_y).tolist() == [9, 18, 27, 36]
    indices = np.concatenate([train_x.ravel(), val_x.ravel()])
    assert sorted(indices.tolist()) == list(range(100))  # every example exactly once
    assert np.array_equal(labels[val_x.ravel()], val_y)  # labels travel with their images
    (_, _), (same_val_x, _) = data.split_train_val(images, labels, 0.1, seed=0)
    (_, _), (other_val_x, _) = data.split_train_val(images, labels, 0.1, seed=1)
    assert np.array_equal(val_x, same_val_x)
    assert not np.array_equal(val_x, other_val_x)


def test_split_train_val_refuses_an_empty_split():
    images = np.zeros((3, 2, 2, 1), np.uint8)
    expected = "data.val_fraction=0.1 of the 3 training examples leaves no validation example"
    with pytest.raises(ConfigError, match=expected):
        data.split_train_val(images, np.arange(3, dtype=np.int64), 0.1, seed=0)


# ---------------------------------------------------------------------------------- tfds


@pytest.mark.parametrize(
    ("name", "shape", "num_classes"),
    [("cifar10", (32, 32, 3), 10), ("mnist", (28, 28, 1), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_load_tfds_mocked(tfds, tmp_path, name, shape, num_classes):
    manual = tmp_path / "manual"
    manual.mkdir()
    # mock_data no-ops download_and_prepare but not our offline probe, which is skipped
    # when the archives are in manual_dir, as they would be for a real offline user.
    for info in tfds.builder_cls(name).url_infos.values():
        (manual / info.filename).touch()
    with tfds.testing.mock_data(num_examples=6):
        (images, labels), (test_images, test_labels), names = data.load_tfds(
            name, tmp_path / "tfds", manual
        )
    assert images.shape == (6, *shape) and test_images.shape == (6, *shape)
    assert images.dtype == np.uint8 and labels.dtype == np.int64 and labels.shape == (6,)
    assert names == tfds.builder(name, data_dir=tmp_path).info.features["label"].names
    assert len(names) == num_classes
    assert labels.max() < num_classes


def test_load_tfds_takes_class_names_from_metadata(tfds, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for info in tfds.builder_cls("fashion_mnist").url_infos.values():
        (manual / info.filename).touch()
    with tfds.testing.mock_data(num_examples=2):
        _, _, names = data.load_tfds("fashion_mnist", tmp_path / "tfds", manual)
    assert names[:3] == ["T-shirt/top", "Trouser", "Pullover"]


def _fake_cifar10_archive(path: Path, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """A tiny archive in the real CIFAR-10 binary layout; returns its train images (HWC)."""
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_images = []

    def add(tar: tarfile.TarFile, member: str, payload: bytes) -> None:
        info = tarfile.TarInfo(f"cifar-10-batches-bin/{member}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    with tarfile.open(path, "w:gz") as tar:
        for member in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            planar = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)  # N, C, H, W
            record_labels = rng.integers(0, 10, size=(3, 1), dtype=np.uint8)
            add(tar, member, np.hstack([record_labels, planar.reshape(3, -1)]).tobytes())
            if member != "test_batch.bin":
                train_images.append(planar.transpose(0, 2, 3, 1))
        add(tar, "batches.meta.txt", ("\n".join(names) + "\n").encode())
    return np.concatenate(train_images), names


def test_load_tfds_prepares_from_manual_archive_then_reuses_it_offline(tfds, tmp_path, monkeypatch):
    """The real (unmocked) TFDS path: archive in manual_dir -> prepared records -> arrays."""
    from tensorflow_datasets.image_classification import cifar

    manual = tmp_path / "manual"
    manual.mkdir()
    archive = manual / "cifar-10-binary.tar.gz"
    expected_images, expected_names = _fake_cifar10_archive(archive, np.random.default_rng(0))
    # Register the fake archive's checksum in place of the real one; all else is real TFDS.
    url_info = tfds.core.download.checksums.compute_url_info(archive)
    monkeypatch.setattr(cifar.Cifar10, "url_infos", {CIFAR10_URL: url_info}, raising=False)

    (images, labels), (test_images, _), names = data.load_tfds("cifar10", tmp_path / "tfds", manual)
    assert names == expected_names  # read from the archive while preparing
    assert images.shape == (15, 32, 32, 3) and test_images.shape == (3, 32, 32, 3)
    assert sorted(map(bytes, images)) == sorted(map(bytes, expected_images))  # HWC, unaltered

    empty_manual = tmp_path / "empty"
    empty_manual.mkdir()  # prepared already: no archive and no network needed
    (again, _), _, _ = data.load_tfds("cifar10", tmp_path / "tfds", empty_manual)
    assert np.array_equal(again, images)


def test_load_tfds_offline_fails_fast_with_instructions(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(DataUnavailableError) as caught:
        data.load_tfds("cifar10", tmp_path / "tfds", manual)  # this machine has no network
    message = str(caught.value)
    assert "'cifar10'" in message and CIFAR10_URL in message
    assert f"put cifar-10-binary.tar.gz in {manual.resolve()}" in message
    assert "python -m flows.pipeline data.source=synthetic" in message
    assert "data.source: synthetic" in message
    assert isinstance(caught.value.__cause__, OSError)  # the DNS error, chained


def test_load_tfds_wraps_a_failed_download(tmp_path, monkeypatch):
    """If DNS resolves but the download still fails, the same error comes out of TFDS's."""
    import requests
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(data, "dns_error", lambda url: None)  # skip the DNS probe
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS would retry for ~3.5 minutes
    with pytest.raises(DataUnavailableError, match="cifar-10-binary.tar.gz") as caught:
        data.load_tfds("cifar10", tmp_path / "tfds", tmp_path)
    assert isinstance(caught.value.__cause__, requests.ConnectionError)


def test_load_tfds_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="'cifar11' is not a TFDS dataset.*cifar10, cifar100"):
        data.load_tfds("cifar11", tmp_path, tmp_path)


def test_load_tfds_refuses_non_image_datasets(tmp_path):
    with pytest.raises(ValueError, match="'imdb_reviews' is not image classification"):
        data.load_tfds("imdb_reviews", tmp_path, tmp_path)


# ---------------------------------------------------------------------- prepare and files


def test_prepare_dataset_synthetic(data_cfg, tmp_path):
    ds = data.prepare_dataset(data_cfg, tmp_path)
    assert ds.counts == {"train": 180, "val": 20, "test": 50}  # val_fraction 0.1 from params
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
    assert np.bincount(ds.val_labels).tolist() == [2] * 10


def test_dataset_rejects_wrong_dtypes():
    images = np.zeros((2, 4, 4, 1), np.uint8)
    labels = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="val images must be uint8 NHWC"):
        data.Dataset(images, labels, images.astype(np.float32), labels, images, labels, ("a",))
    with pytest.raises(ValueError, match="test labels fall outside"):
        data.Dataset(images, labels, images, labels, images, labels + 1, ("a",))


def test_write_and_load_round_trip(data_cfg, tmp_path):
    ds = data.prepare_dataset(data_cfg, tmp_path)
    out = Workspace(tmp_path).prepared
    meta = data.write_prepared(ds, out, data_cfg)
    assert meta == {
        "modality": "image",
        "dataset": "synthetic",
        "source": "synthetic",
        "class_names": [f"class_{k}" for k in range(10)],
        "num_classes": 10,
        "image_shape": [32, 32, 3],
        "counts": {"train": 180, "val": 20, "test": 50},
    }
    assert prepared.load_meta(out) == meta == json.loads((out / "meta.json").read_text())
    files = sorted(p.name for p in out.iterdir())
    assert files == ["meta.json", "test.npz", "train.npz", "val.npz"]
    for split in prepared.SPLITS:
        images, labels = prepared.load_split(out, split)
        expected_images, expected_labels = ds.split(split)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert np.array_equal(images, expected_images)
        assert np.array_equal(labels, expected_labels)
        with zipfile.ZipFile(out / f"{split}.npz") as archive:  # np.savez, uncompressed
            assert sorted(archive.namelist()) == ["images.npy", "labels.npy"]
            assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # no leftovers


def test_meta_names_the_tfds_dataset(data_cfg):
    ds = data.Dataset(*[np.zeros((1, 2, 2, 1), np.uint8), np.zeros(1, np.int64)] * 3, ("a", "b"))
    meta = data.build_meta(ds, data_cfg.model_copy(update={"source": "tfds", "name": "mnist"}))
    assert (meta["dataset"], meta["source"], meta["image_shape"]) == ("mnist", "tfds", [2, 2, 1])


def test_failed_write_keeps_previous_output_and_no_temp_dirs(data_cfg, tmp_path, monkeypatch):
    ds = data.prepare_dataset(data_cfg, tmp_path)
    out = tmp_path / "data" / "prepared"
    data.write_prepared(ds, out, data_cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_savez = np.savez
    calls = []

    def savez_failing_on_second_split(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_savez(path, **arrays)

    monkeypatch.setattr(np, "savez", savez_failing_on_second_split)
    other = data.prepare_dataset(data_cfg.model_copy(update={"seed": 1}), tmp_path)
    with pytest.raises(OSError, match="disk full"):
        data.write_prepared(other, out, data_cfg)
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]


def test_rewrite_replaces_previous_output(data_cfg, tmp_path):
    out = tmp_path / "prepared"
    data.write_prepared(data.prepare_dataset(data_cfg, tmp_path), out, data_cfg)
    (out / "stale.txt").write_text("from an older run")
    other = data.prepare_dataset(data_cfg.model_copy(update={"seed": 1}), tmp_path)
    data.write_prepared(other, out, data_cfg)
    assert not (out / "stale.txt").exists()
    assert np.array_equal(prepared.load_split(out, "train")[0], other.train_images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_run_writes_the_workspace_prepared_dir_and_logs_to_mlflow(tiny_cfg, tmp_path):
    import mlflow

    ws = Workspace(tmp_path)
    meta = data_stage.run(tiny_cfg, ws)
    assert prepared.load_meta(ws.prepared) == meta
    assert meta["counts"]["train"] + meta["counts"]["val"] == tiny_cfg.data.synthetic.train_size
    run_id = json.loads(ws.run_handle.read_text())["run_id"]
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.params["data.test_examples"] == str(tiny_cfg.data.synthetic.test_size)
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "data")] == [
        "data/meta.json"
    ]


def test_loading_before_the_data_stage_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro data"):
        prepared.load_meta(tmp_path / "prepared")
    with pytest.raises(FileNotFoundError, match="dvc repro data"):
        prepared.load_split(tmp_path / "prepared", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        prepared.load_split(tmp_path, "dev")


# ------------------------------------------------------------- class subsets, few labels


def test_a_class_subset_is_relabelled_in_the_order_given(data_cfg, tmp_path):
    """data.classes [7, 2, 5]: only those classes, as labels 0, 1, 2 with their names."""
    cfg = data_cfg.model_copy(update={"classes": [7, 2, 5]})
    full = data.prepare_dataset(data_cfg, tmp_path)
    ds = data.prepare_dataset(cfg, tmp_path)
    assert ds.class_names == ("class_7", "class_2", "class_5")
    for split in ("train", "val", "test"):
        assert set(ds.split(split)[1].tolist()) == {0, 1, 2}
    test_images, test_labels = full.split("test")
    kept = np.isin(test_labels, [7, 2, 5])
    np.testing.assert_array_equal(ds.test_images, test_images[kept])
    relabelled = [{7: 0, 2: 1, 5: 2}[int(label)] for label in test_labels[kept]]
    np.testing.assert_array_equal(ds.test_labels, relabelled)
    meta = data.build_meta(ds, cfg)
    assert meta["dataset"] == "synthetic-classes-7-2-5"


def test_a_label_budget_keeps_a_seeded_few_per_class_in_order():
    labels = np.repeat(np.arange(3), 40)
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1)
    kept_images, kept_labels = data.limit_labels(images, labels, 5, seed=1)
    assert np.bincount(kept_labels).tolist() == [5, 5, 5]
    assert np.all(np.diff(kept_images.ravel().astype(int)) > 0), "original order kept"
    again, _ = data.limit_labels(images, labels, 5, seed=1)
    other, _ = data.limit_labels(images, labels, 5, seed=2)
    np.testing.assert_array_equal(kept_images, again)
    assert not np.array_equal(kept_images, other)


def test_a_class_the_data_lacks_is_named():
    from tasks.errors import DataFileError

    labels = np.arange(5).repeat(2)
    with pytest.raises(DataFileError, match=r"data.classes \[3, 9\] names class 9"):
        data.select_classes((np.zeros((10, 1, 1, 1), np.uint8), labels), [3, 9])
