"""tasks/models/transfer.py with real Keras on CPU: tiny inputs (32x32), mobilenet_v2 mostly.

Weights are compared bit for bit (np.array_equal): loading, freezing and fine-tuning move
float32 arrays without arithmetic, so any difference is a bug, not rounding.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from tasks.errors import TransferWeightsError
from tasks.models.cnn import seed_cnn
from tasks.models.transfer import (
    BASES,
    SCRATCH_BN_MOMENTUM,
    check_weights,
    imagenet_file,
    resolve_weights,
    set_phase,
    transfer_model,
    tunable_layers,
)
from tasks.models.wrap import with_normalization

SHAPE = (32, 32, 3)
CLASSES = 4


def _model(base: str = "mobilenet_v2", head: str = "pool", weights: str | None = None):
    return transfer_model(SHAPE, CLASSES, base=base, head=head, dropout=0.2, weights=weights)


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, *SHAPE)).astype("float32")


def _snapshot(layers) -> dict[str, list[np.ndarray]]:
    return {layer.name: [w.numpy().copy() for w in layer.weights] for layer in layers}


def _changed(before: dict[str, list[np.ndarray]], layers) -> set[str]:
    return {layer.name for layer in layers if not _equal(before[layer.name], layer.weights)}


def _equal(expected, weights) -> bool:
    """Bit for bit, in order; ``expected`` may hold arrays or Keras variables."""
    return len(expected) == len(weights) and all(
        np.array_equal(np.asarray(a), w.numpy()) for a, w in zip(expected, weights, strict=True)
    )


def _randomize_bn_statistics(backbone, seed: int = 1) -> None:
    """BN moving means/variances start at 0/1 in every instance: make them tell apart."""
    rng = np.random.default_rng(seed)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2, size=layer.moving_variance.shape))


def _fit(model, steps: int = 2) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(_pixels(8 * steps), np.arange(8 * steps) % CLASSES, batch_size=8, verbose=0)


# -------------------------------------------------------------------------- the model


def test_a_weights_file_loads_into_the_base_exactly(tmp_path):
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=SHAPE)
    _randomize_bn_statistics(source)
    path = tmp_path / "source.weights.h5"
    source.save_weights(path)
    model = _model(weights=str(path))
    loaded = model.get_layer("base").weights
    assert _equal(source.weights, loaded)
    assert not np.array_equal(_model().get_layer("base").weights[0].numpy(), loaded[0].numpy())


def test_frozen_phase_trains_the_head_only_and_finetune_the_top_k_layers():
    keras.utils.set_random_seed(0)
    model = _model(head="seed")
    backbone = model.get_layer("base")
    _randomize_bn_statistics(backbone)
    head = [model.get_layer(name) for name in ("head_dense", "logits")]
    everything = [*backbone.layers, *head]

    set_phase(model, "frozen", unfreeze=0)
    before = _snapshot(everything)
    _fit(model)
    assert _changed(before, everything) == {"head_dense", "logits"}

    k = 3
    set_phase(model, "finetune", unfreeze=k)
    top_k = {layer.name for layer in tunable_layers(backbone)[-k:]}
    assert top_k == {"block_16_depthwise", "block_16_project", "Conv_1"}
    before = _snapshot(everything)
    _fit(model)  # recompiles, as the caller must after set_phase
    assert _changed(before, everything) == top_k | {"head_dense", "logits"}


def test_finetune_all_leaves_batch_norm_frozen():
    model = _model()
    backbone = model.get_layer("base")
    set_phase(model, "finetune", unfreeze=0)
    tunable = tunable_layers(backbone)
    assert {id(w) for w in model.trainable_weights} == {
        id(w) for layer in [*tunable, model.get_layer("logits")] for w in layer.weights
    }
    assert not any(
        layer.trainable
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    with pytest.raises(ValueError, match=rf"model.unfreeze must be 0 \(all\) .. {len(tunable)}"):
        set_phase(model, "finetune", unfreeze=len(tunable) + 1)
    with pytest.raises(ValueError, match="frozen, finetune"):
        set_phase(model, "thaw", unfreeze=0)


def test_from_scratch_batch_norm_statistics_keep_up_with_short_runs(tmp_path):
    """weights none: BN momentum SCRATCH_BN_MOMENTUM (Keras' 0.999 left MobileNetV2's
    inference outputs constant after 80 steps); a pretrained base keeps Keras' own."""

    def momenta(model) -> set[float]:
        layers = model.get_layer("base").layers
        return {lyr.momentum for lyr in layers if isinstance(lyr, keras.layers.BatchNormalization)}

    scratch = _model()
    assert momenta(scratch) == {SCRATCH_BN_MOMENTUM}
    path = tmp_path / "scratch.keras"
    scratch.save(path)
    assert momenta(keras.models.load_model(path, safe_mode=True)) == {SCRATCH_BN_MOMENTUM}
    weights = tmp_path / "base.weights.h5"
    scratch.get_layer("base").save_weights(weights)
    assert momenta(_model(weights=str(weights))) == {0.999}


@pytest.mark.parametrize("base", sorted(BASES))
def test_saved_model_reloads_safely_and_preprocesses_like_keras(tmp_path, base):
    model = _model(base=base, head="seed" if base == "vgg16" else "pool")
    assert model.name == f"transfer_{base}" and model.get_layer("base").name == "base"
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    x = _pixels(3)
    assert np.array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))

    # The reloaded graph's input to its base is the base's own preprocess_input.
    base_input = reloaded.get_layer("base")._inbound_nodes[0].input_tensors[0]
    preprocessed = keras.Model(reloaded.input, base_input)(x).numpy()
    expected = getattr(keras.applications, BASES[base].module).preprocess_input(x.copy())
    np.testing.assert_allclose(preprocessed, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(preprocessed - expected).max() == 0  # the same ops: measured exact


def test_logits_are_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("base").compute_dtype == "float16"
    assert model.output.dtype == "float32"


def test_build_model_works_before_anything_imports_the_transfer_module():
    """The builder named `transfer` must not shadow the module tasks.models.transfer in a
    fresh process (train_model, as benchmarks call it, imports nothing else first)."""
    code = (
        "import sys; from tasks.config import load_config; "
        "from tasks.models.build import build_model; "
        "assert 'tasks.models.transfer' not in sys.modules; "
        "cfg = load_config('params.yaml', {'model.name': 'transfer', "
        "'model.base': 'mobilenet_v2', 'model.weights': 'none'}); "
        "print(build_model(cfg.model, (32, 32, 3), 5).name)"
    )
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "transfer_mobilenet_v2"


def test_bad_shapes_and_names_are_refused():
    with pytest.raises(ValueError, match="RGB input of at least 32x32"):
        transfer_model((28, 28, 1), 10, base="mobilenet_v2", head="pool", dropout=0, weights=None)
    with pytest.raises(ValueError, match="model.base must be one of vgg16, resnet50"):
        transfer_model(SHAPE, 10, base="vgg19", head="pool", dropout=0, weights=None)
    with pytest.raises(ValueError, match="model.head must be one of seed, pool"):
        transfer_model(SHAPE, 10, base="vgg16", head="mlp", dropout=0, weights=None)


def test_efficientnet_imagenet_file_gives_keras_imagenet_model(tmp_path, monkeypatch):
    """Keras' EfficientNet ImageNet model has an extra Rescaling our base folds in (see
    transfer.py); a legacy .h5 file shaped like Keras' stands in for the real download."""
    import h5py
    from keras.src.applications import efficientnet
    from keras.src.legacy.saving import legacy_h5_format

    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=SHAPE)
    norm = next(lyr for lyr in source.layers if isinstance(lyr, keras.layers.Normalization))
    norm.adapt_mean.assign([0.485, 0.456, 0.406])  # what Keras' ImageNet file holds
    norm.adapt_variance.assign(np.square([0.229, 0.224, 0.225]))
    fname = imagenet_file("efficientnet_b0")[0]
    path = tmp_path / fname
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, source)
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *a, **k: str(path))
    keras_imagenet = keras.applications.EfficientNetB0(
        include_top=False, weights="imagenet", input_shape=SHAPE
    )
    ours = _model(base="efficientnet_b0", weights=str(path)).get_layer("base")

    def stem(model):
        return keras.Model(model.input, model.get_layer("stem_conv").output)(_pixels(2)).numpy()

    expected = stem(keras_imagenet)
    assert np.abs(stem(ours) - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(stem(source) - expected).max() > 0.1 * np.abs(expected).max()  # unfolded


# ----------------------------------------------------------------------- starting weights


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Keras cache, no DNS, and a get_file that fails the test if called."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_download(*args, **kwargs):
        raise AssertionError(f"downloaded {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(keras.utils, "get_file", no_download)
    return tmp_path / "keras-home" / "models"


def test_imagenet_offline_with_an_empty_cache_names_file_url_and_directory(offline):
    fname, url, _ = imagenet_file("vgg16")
    with pytest.raises(TransferWeightsError) as raised:
        resolve_weights("imagenet", "vgg16")
    message = str(raised.value)
    assert "\n" not in message
    assert fname in message and url in message and f"{offline}/" in message
    assert "model.weights=<path to .weights.h5>" in message and "models:/" in message
    assert not offline.exists() or not any(offline.iterdir())  # nothing downloaded


def test_imagenet_from_the_cache_needs_no_network(offline, monkeypatch):
    fname, _, _ = imagenet_file("mobilenet_v2", image_size=32)
    assert fname.endswith("_1.0_224_no_top.h5")  # Keras' rule: 224 weights below 96 px
    assert imagenet_file("mobilenet_v2", image_size=96)[0].endswith("_1.0_96_no_top.h5")
    offline.mkdir(parents=True)
    (offline / fname).write_bytes(b"cached")  # Keras keeps no hash for MobileNetV2
    monkeypatch.setattr(keras.utils, "get_file", lambda fname, *a, **k: str(offline / fname))
    assert resolve_weights("imagenet", "mobilenet_v2", image_size=32) == str(offline / fname)

    vgg = imagenet_file("vgg16")[0]
    (offline / vgg).write_bytes(b"partial download")
    with pytest.raises(TransferWeightsError, match="md5 differs"):
        check_weights("imagenet", "vgg16")


def test_imagenet_online_makes_the_download_keras_makes(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    calls = []
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: calls.append((a, k)) or "got")
    assert resolve_weights("imagenet", "resnet50") == "got"
    fname, url, md5 = imagenet_file("resnet50")
    kwargs = {"cache_subdir": "models", "file_hash": md5, "cache_dir": str(tmp_path)}
    assert calls == [((fname, url), kwargs)]


def test_imagenet_files_are_keras_own():
    from keras.src.applications import efficientnet, mobilenet_v2, resnet, vgg16

    assert imagenet_file("vgg16")[1] == vgg16.WEIGHTS_PATH_NO_TOP
    assert imagenet_file("vgg16")[2] in inspect.getsource(vgg16)
    file, url, md5 = imagenet_file("resnet50")
    assert (url, md5) == (resnet.BASE_WEIGHTS_PATH + file, resnet.WEIGHTS_HASHES["resnet50"][1])
    assert imagenet_file("mobilenet_v2")[1].startswith(mobilenet_v2.BASE_WEIGHT_PATH)
    file, url, md5 = imagenet_file("efficientnet_b0")
    assert (url, md5) == (
        efficientnet.BASE_WEIGHTS_PATH + file,
        efficientnet.WEIGHTS_HASHES["b0"][1],
    )


def test_local_weights_must_exist_and_be_weights_h5(tmp_path):
    (tmp_path / "old.h5").write_bytes(b"")
    with pytest.raises(TransferWeightsError, match=r"model.weights=.*\.weights\.h5"):
        resolve_weights(str(tmp_path / "old.h5"), "mobilenet_v2")
    with pytest.raises(TransferWeightsError, match=r"model.weights file .*missing.weights.h5"):
        check_weights(str(tmp_path / "missing.weights.h5"), "mobilenet_v2")
    assert resolve_weights("none", "mobilenet_v2") is None


# --------------------------------------------------------------------- registered bases


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("transfer", artifact_location=str(tmp_path / "art"))
    yield client, experiment
    mlflow.set_registry_uri("")
    mlflow.set_tracking_uri("")
    os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri exports it


def _register(client, experiment: str, name: str, model, tmp_path) -> str:
    """A version whose artifacts hold the raw-pixel wrapper's .keras file, as registered."""
    wrapper = with_normalization(model, [0.0] * 3, [1.0] * 3)
    path = tmp_path / f"{name}.keras"
    wrapper.save(path)
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(path), artifact_path="model")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/model"
    return client.create_model_version(name, source, run_id=run.info.run_id).version


def test_a_registered_transfer_models_base_becomes_a_weights_file(registry, tmp_path):
    client, experiment = registry
    trained = _model()
    _randomize_bn_statistics(trained.get_layer("base"))
    version = _register(client, experiment, "cifar-transfer", trained, tmp_path)
    client.set_registered_model_alias("cifar-transfer", "champion", version)

    by_version = resolve_weights("models:/cifar-transfer/1", "mobilenet_v2", dest_dir=tmp_path)
    assert by_version.endswith(".weights.h5") and os.path.dirname(by_version) == str(tmp_path)
    by_alias = resolve_weights("models:/cifar-transfer@champion", "mobilenet_v2")
    for path in (by_version, by_alias):
        rebuilt = _model(head="seed", weights=path).get_layer("base").weights
        assert _equal(trained.get_layer("base").weights, rebuilt)

    with pytest.raises(TransferWeightsError, match=r"holds a mobilenet_v2 base .*not the resnet50"):
        resolve_weights("models:/cifar-transfer/1", "resnet50")

    _register(client, experiment, "cifar-seed", seed_cnn(SHAPE, CLASSES), tmp_path)
    with pytest.raises(
        TransferWeightsError, match=r"models:/cifar-seed/1 has no layer named 'base'"
    ):
        resolve_weights("models:/cifar-seed/1", "mobilenet_v2")
    with pytest.raises(TransferWeightsError, match=r"models:/cifar-transfer/7: the registry at"):
        check_weights("models:/cifar-transfer/7", "mobilenet_v2")
    with pytest.raises(TransferWeightsError, match=r"is not models:/<name>@<alias>"):
        check_weights("models:/cifar-transfer", "mobilenet_v2")


# ------------------------------------------------------- the registered raw-pixel wrapper


@pytest.mark.parametrize(
    ("data_shape", "model_shape"),
    [((28, 28, 1), (32, 32, 3)), ((32, 32, 3), (48, 48, 3))],
    ids=["fashion-to-32rgb", "cifar-to-48"],
)
@pytest.mark.parametrize("tta_flip", [False, True], ids=["plain", "tta"])
def test_wrapper_takes_data_pixels_like_the_dali_pipeline(
    tmp_path, data_shape, model_shape, tta_flip
):
    from tasks.images.augment import build_eval_pipeline, iterate_numpy

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(model_shape),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(CLASSES),
        ]
    )
    mean, std = [120.0, 110.0, 100.0], [60.0, 55.0, 50.0]  # per model channel, as DALI's
    raw = np.random.default_rng(0).integers(0, 256, (16, *data_shape), dtype=np.uint8)
    pipe = build_eval_pipeline(
        raw,
        np.zeros(16),
        mean=mean,
        std=std,
        batch_size=16,
        device="cpu",
        num_threads=2,
        input_shape=model_shape,
    )
    [(normalized, _)] = list(iterate_numpy(pipe))
    expected = model.predict(normalized, verbose=0)
    if tta_flip:
        expected = (expected + model.predict(normalized[:, :, ::-1], verbose=0)) / 2

    wrapper = with_normalization(model, mean, std, tta_flip=tta_flip, data_shape=data_shape)
    assert wrapper.input_shape == (None, *data_shape)
    path = tmp_path / "raw.keras"
    wrapper.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    got = reloaded.predict(raw.astype("float32"), verbose=0)
    assert np.array_equal(got, wrapper.predict(raw.astype("float32"), verbose=0))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
