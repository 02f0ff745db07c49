"""The train stage's core on tiny synthetic data: learns, is reproducible, fits any shape."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import load_config
from tasks.images import augment, data
from tasks.models.build import build_model
from tasks.models.wrap import with_normalization
from tasks.stages.train import train_model
from tests.helpers.project import PARAMS, tiny_overrides


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = load_config(PARAMS, tiny_overrides(root) | {"train.epochs": 3})
    ds = data.prepare_dataset(cfg.data, root)
    stats = augment.channel_stats(ds.train_images)
    return cfg, ds, stats


def fit(cfg, ds, stats):
    return train_model(
        cfg, ds.split("train"), ds.split("val"), ds.num_classes, stats, callbacks=None
    )


def test_training_learns_and_is_reproducible(tiny_data):
    cfg, ds, stats = tiny_data
    _, first = fit(cfg, ds, stats)
    _, second = fit(cfg, ds, stats)
    assert first == second, "same seed, params and data must give the same metrics on CPU"
    assert set(first) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(first["loss"]) == 3
    assert first["loss"][-1] < first["loss"][0]
    assert first["val_accuracy"][-1] > 2 / ds.num_classes  # chance is 1/10


def test_a_different_seed_gives_different_metrics(tiny_data):
    cfg, ds, stats = tiny_data
    _, base = fit(cfg, ds, stats)
    other_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 7})})
    _, other = fit(other_cfg, ds, stats)
    assert base["loss"] != other["loss"]


def test_seed_cnn_is_the_seed_architecture():
    model = build_model(model_cfg("seed_cnn"), (32, 32, 3), 10)
    layers = [
        (type(layer).__name__, getattr(layer, "filters", getattr(layer, "units", None)))
        for layer in model.layers
    ]
    assert layers == [
        ("Conv2D", 32),
        ("MaxPooling2D", None),
        ("Conv2D", 64),
        ("MaxPooling2D", None),
        ("Conv2D", 64),
        ("Flatten", None),
        ("Dense", 64),
        ("Dense", 10),
    ]
    assert model.layers[-1].activation.__name__ == "linear"  # logits


def model_cfg(name: str):
    return load_config(PARAMS, {"model.name": name}).model


@pytest.mark.parametrize("name", ["seed_cnn", "fast_cnn"])  # transfer: tests/test_transfer.py
@pytest.mark.parametrize(
    ("shape", "classes"), [((32, 32, 3), 10), ((28, 28, 1), 10), ((32, 32, 3), 100)]
)
def test_cnns_take_shape_and_classes_from_metadata(name, shape, classes):
    model = build_model(model_cfg(name), shape, classes)
    assert model.output_shape == (None, classes)
    assert model.input_shape == (None, *shape)


def test_registered_wrapper_normalizes_raw_pixels():
    model = build_model(model_cfg("seed_cnn"), (32, 32, 3), 10)
    mean, std = [120.0, 110.0, 100.0], [60.0, 50.0, 40.0]
    raw = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    wrapped = with_normalization(model, mean, std)
    expected = model.predict((raw - np.array(mean)) / np.array(std), verbose=0)
    np.testing.assert_allclose(wrapped.predict(raw, verbose=0), expected, rtol=1e-4, atol=1e-4)
