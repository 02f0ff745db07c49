"""Transfer learning (`model.name: transfer`): a keras.applications base under a new head.

The model takes raw pixels (float32, 0..255) like every model here once wrapped, and
applies the base's own ``preprocess_input`` inside itself. Keras 3 records that function's
ops (GetItem, Stack, Add, Divide, ...) as stock operations of the functional graph: a model
built this way saved to ``.keras`` reloads with ``safe_mode=True`` and gives the same
numbers (measured, Keras 3.15.1; tests/test_transfer.py checks it), so no Lambda layer and
no second copy of the ImageNet means is needed.

The base is one nested ``keras.Model`` layer named ``base``, always called with
``training=False``: its BatchNormalization layers normalize with their moving statistics
and never update them, in the frozen and the fine-tuning phase alike (Keras' transfer
learning guide). Training runs in two phases the caller drives with `set_phase` and a
recompile: ``frozen`` trains the head only, ``finetune`` also the top layers of the base.

Starting weights (`resolve_weights`): ``none`` (random init), ``imagenet`` (Keras' own
no-top files, from its cache or downloaded like Keras does), a local ``.weights.h5`` file,
or the base of a registered model version (``models:/<name>@<alias>``, ``models:/<name>/<v>``).
`check_weights` is the cheap check a stage runs before any work.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import ModelFileError, TransferWeightsError, dns_error

MIN_SIZE = 32  # px: the smallest input every keras.applications base here accepts
HEADS = ("seed", "pool")
PHASES = ("frozen", "finetune", "scratch")  # scratch: weights none, every layer trains
# BatchNormalization momentum of a base trained from scratch (per step). keras.applications
# builds its bases with 0.999 (MobileNetV2) or Keras' default 0.99, made for ImageNet-long
# runs: after a few hundred steps the moving statistics are still mostly their initial 0/1,
# so inference (validation, test, the registered model) sees un-normalized activations. Measured
# here: MobileNetV2 from scratch on 250 Fashion-MNIST images, 20 epochs (80 steps), 61%
# training accuracy and exactly 20% (one class for every image) on validation. 0.9 as in
# fast_cnn; a pretrained base keeps its own (its BN layers never update, see set_phase).
SCRATCH_BN_MOMENTUM = 0.9
_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications"
# MobileNetV2's ImageNet weights exist for these square input sizes; Keras loads the 224
# ones for any other size (keras/src/applications/mobilenet_v2.py).
_MOBILENET_SIZES = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class Base:
    """A keras.applications base without its top, and Keras' ImageNet no-top weights for it.

    ``weights_url`` and ``weights_md5`` are copied from keras/src/applications/*.py
    (WEIGHTS_PATH_NO_TOP, BASE_WEIGHTS_PATH, WEIGHTS_HASHES; Keras has no hash for
    MobileNetV2); the file name is the URL's last part, as in Keras' get_file calls.
    """

    application: str  # keras.applications.<application>(include_top=False, ...)
    module: str  # keras.applications.<module>.preprocess_input
    weights_url: str  # "{rows}" is the MobileNetV2 input size the weights were trained at
    weights_md5: str | None


BASES: dict[str, Base] = {
    "vgg16": Base(
        "VGG16",
        "vgg16",
        f"{_KERAS_URL}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
    ),
    "resnet50": Base(
        "ResNet50",
        "resnet50",
        f"{_KERAS_URL}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
    "mobilenet_v2": Base(
        "MobileNetV2",
        "mobilenet_v2",
        f"{_KERAS_URL}/mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{{rows}}_no_top.h5",
        None,
    ),
    "efficientnet_b0": Base(
        "EfficientNetB0",
        "efficientnet",
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        "50bc09e76180e00e4465e1a485ddc09d",
    ),
}
# EfficientNet's ImageNet model has one extra layer after its input Normalization,
# Rescaling(1 / sqrt(stddev)) per RGB channel, that Keras adds only when weights="imagenet"
# (keras/src/applications/efficientnet.py, tensorflow/tensorflow#49930). Our base is always
# built without it, so loading Keras' file folds that factor into the Normalization's
# variance: (x - m) / sqrt(v) * c == (x - m) / sqrt(v / c**2), with c**2 = 1 / stddev.
_EFFICIENTNET_IMAGENET_STDDEV = (0.229, 0.224, 0.225)


def _base(name: str) -> Base:
    if name not in BASES:
        raise ValueError(f"model.base must be one of {', '.join(BASES)}, got {name!r}")
    return BASES[name]


# ------------------------------------------------------------------------------ the model


def transfer_model(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    base: str,
    head: str,
    dropout: float,
    weights: str | None,
) -> Any:
    """Raw pixels (S, S, 3) -> the base's preprocess_input -> ``base`` -> head -> logits.

    ``head="seed"`` is the seed CNN's head (Flatten, Dense 256 relu, Dense); ``"pool"`` is
    global average pooling, Dropout(``dropout``), Dense. Logits are float32 even under a
    mixed-precision policy. ``weights``: a file from `resolve_weights` (None: random init).
    """
    import keras

    spec = _base(base)
    if head not in HEADS:
        raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got {head!r}")
    height, width, channels = input_shape
    if min(height, width) < MIN_SIZE or channels != 3:
        raise ValueError(
            f"a {base} base needs RGB input of at least {MIN_SIZE}x{MIN_SIZE}, got "
            f"{tuple(input_shape)}: set the model's input size (grayscale data is expanded "
            "to RGB and resized by the DALI pipeline)"
        )
    pixels = keras.Input(shape=tuple(input_shape), name="pixels")
    x = getattr(keras.applications, spec.module).preprocess_input(pixels)
    backbone = _application(base, tuple(input_shape))
    if weights is not None:
        load_base_weights(backbone, base, weights)
        x = backbone(x, training=False)  # BN in inference mode in both phases
    else:  # from scratch: nothing to preserve, BN learns its statistics as usual
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM
        x = backbone(x)
    if head == "seed":
        x = keras.layers.Flatten(name="head_flatten")(x)
        x = keras.layers.Dense(256, activation="relu", name="head_dense")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(pixels, logits, name=f"transfer_{base}")


def _application(base: str, input_shape: tuple[int, int, int]) -> Any:
    """A randomly initialized no-top ``base`` named ``base``."""
    import keras

    build = getattr(keras.applications, _base(base).application)
    return build(include_top=False, weights=None, input_shape=input_shape, name="base")


def load_base_weights(backbone: Any, base: str, path: str) -> None:
    """Load ``path`` into ``backbone``: a ``.weights.h5`` file (saved from such a base), or
    Keras' own ImageNet ``.h5`` file from `resolve_weights`."""
    import keras

    if not Path(path).is_file():
        raise TransferWeightsError(f"model.weights file {path} not found")
    backbone.load_weights(path)
    if base == "efficientnet_b0" and not path.endswith(".weights.h5"):
        norm = next(lyr for lyr in backbone.layers if isinstance(lyr, keras.layers.Normalization))
        norm.adapt_variance.assign(norm.adapt_variance * _EFFICIENTNET_IMAGENET_STDDEV)
        norm.finalize_state()  # its mean/variance tensors are snapshots of the variables


def tunable_layers(backbone: Any) -> list[Any]:
    """The base's layers that training can change, bottom to top: those with weights, less
    BatchNormalization and Normalization (their weights are statistics, kept as loaded)."""
    import keras

    stats = (keras.layers.BatchNormalization, keras.layers.Normalization)
    return [lyr for lyr in backbone.layers if lyr.weights and not isinstance(lyr, stats)]


def set_phase(model: Any, phase: str, unfreeze: int) -> None:
    """``frozen``: the base is not trainable. ``finetune``: the top ``unfreeze`` of
    `tunable_layers` are (0: all of them); BatchNormalization layers never are.
    ``scratch`` (model.weights none): every layer is, BatchNormalization included.

    Keras reads trainability when a model is compiled: recompile after this call.
    """
    backbone = model.get_layer("base")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if phase == "frozen":
        backbone.trainable = False
        return
    if phase == "scratch":
        backbone.trainable = True
        for layer in backbone.layers:
            layer.trainable = True
        return
    tunable = tunable_layers(backbone)
    if not 0 <= unfreeze <= len(tunable):
        raise ValueError(
            f"model.unfreeze must be 0 (all) .. {len(tunable)} (the {backbone.name} layers "
            f"with trainable weights), got {unfreeze}"
        )
    top = {id(lyr) for lyr in (tunable[-unfreeze:] if unfreeze else tunable)}
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = id(layer) in top


# ----------------------------------------------------------------------- starting weights


def imagenet_file(base: str, image_size: int = 224) -> tuple[str, str, str | None]:
    """(file name, URL, md5 or None) of Keras' ImageNet no-top weights for ``base``.

    ``image_size`` matters for MobileNetV2 only, with Keras' rule: its own size when
    weights exist for it, else 224.
    """
    spec = _base(base)
    rows = image_size if image_size in _MOBILENET_SIZES else 224
    url = spec.weights_url.format(rows=rows)
    return url.rsplit("/", 1)[1], url, spec.weights_md5


def keras_models_dir() -> Path:
    """Where keras.applications caches weights: ``$KERAS_HOME/models``, else ~/.keras/models.

    Read at call time; Keras reads KERAS_HOME once, at import, so downloads name it.
    """
    home = os.environ["KERAS_HOME"] if "KERAS_HOME" in os.environ else Path.home() / ".keras"
    return Path(home).expanduser() / "models"


def check_weights(spec: str, base: str, *, image_size: int = 224) -> None:
    """Fail now, with what to do, if `resolve_weights` cannot succeed: cheap (no download,
    no model loaded), for a stage to call before any work.

    ``imagenet``: the file is cached or its host resolves. A path: exists, ends in
    ``.weights.h5``. ``models:/``: the registry has that version or alias.
    """
    _base(base)
    if spec == "none":
        return
    if spec == "imagenet":
        _imagenet_offline_check(base, image_size)
    elif spec.startswith("models:/"):
        _registered_version(spec)
    else:
        _local_weights_file(spec)


def resolve_weights(
    spec: str, base: str, *, image_size: int = 224, dest_dir: Path | None = None
) -> str | None:
    """The weights file to build a ``base`` from, for `transfer_model` (None: random init).

    ``spec`` (params ``model.weights``): ``none`` (the same architecture from scratch),
    ``imagenet``, a local ``.weights.h5`` path, or ``models:/<name>@<alias>`` /
    ``models:/<name>/<version>``, whose ``base`` layer's weights are saved to a
    ``.weights.h5`` file in ``dest_dir`` (default: a new temp dir). ``image_size`` picks
    MobileNetV2's ImageNet file. Runs `check_weights` first.
    """
    check_weights(spec, base, image_size=image_size)
    if spec == "none":
        return None
    if spec == "imagenet":
        return _imagenet_weights(base, image_size)
    if spec.startswith("models:/"):
        return _registered_base_weights(spec, base, dest_dir)
    return spec


def _local_weights_file(path: str) -> None:
    if not path.endswith(".weights.h5"):
        raise TransferWeightsError(
            f"model.weights={path!r} is none of none, imagenet, models:/<name>@<alias> or a "
            "Keras weights file: a file path must end in .weights.h5 (model.save_weights)"
        )
    if not Path(path).is_file():
        raise TransferWeightsError(
            f"model.weights file {Path(path).resolve()} not found: fix the path, or use "
            "model.weights=imagenet or models:/<name>@<alias>"
        )


def _md5_matches(path: Path, md5: str | None) -> bool:
    if md5 is None:
        return True
    digest = hashlib.md5()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == md5


def _imagenet_offline_check(base: str, image_size: int) -> None:
    """Pass when the cached file is whole or its host resolves (then Keras downloads it)."""
    fname, url, md5 = imagenet_file(base, image_size)
    cached = keras_models_dir() / fname
    if cached.is_file() and _md5_matches(cached, md5):
        return
    if dns_error(url) is None:
        return
    problem = "is not the file Keras expects (md5 differs)" if cached.exists() else "is missing"
    raise TransferWeightsError(
        f"model.weights=imagenet for {base}: {cached} {problem} and {url} cannot be "
        f"downloaded (its host does not resolve: offline?): put {fname} from that URL in "
        f"{cached.parent}/, or set model.weights=<path to .weights.h5> or "
        "model.weights=models:/<name>@<alias>"
    )


def _imagenet_weights(base: str, image_size: int) -> str:
    """Keras' cached file, or the download keras.applications itself makes (same file name,
    URL, cache subdir and hash); get_file skips the download when the cached file is whole."""
    import keras

    fname, url, md5 = imagenet_file(base, image_size)
    return keras.utils.get_file(
        fname,
        url,
        cache_subdir="models",
        file_hash=md5,
        cache_dir=str(keras_models_dir().parent),
    )


# ------------------------------------------------------------------- registered versions


def _registered_version(uri: str) -> Any:
    """The registry's model version for ``models:/<name>@<alias>`` or ``models:/<name>/<v>``."""
    import mlflow

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", uri)
    if match is None:
        raise TransferWeightsError(
            f"model.weights={uri!r} is not models:/<name>@<alias> or models:/<name>/<version>"
        )
    name, alias, version = match.groups()
    client = mlflow.MlflowClient()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as error:
        raise TransferWeightsError(
            f"model.weights={uri}: the registry at {mlflow.get_registry_uri()} has no such "
            f"model version ({error.message.splitlines()[0]})"
        ) from None


def _find_base(model: Any) -> tuple[Any, Any] | None:
    """(the nested model named ``base``, the model holding it), searched depth-first."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if layer.name == "base":
                return layer, model
            if found := _find_base(layer):
                return found
    return None


def _architecture(model: Any) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Layer classes and weight shapes, in order: what load_weights needs to match (layer
    names are not compared: Keras numbers unnamed layers per process)."""
    return [(type(lyr).__name__, [tuple(w.shape) for w in lyr.weights]) for lyr in model.layers]


def _registered_base_weights(uri: str, base: str, dest_dir: Path | None) -> str:
    """The ``base`` layer of the registered version, saved as ``<base>-<name>.weights.h5`` in
    ``dest_dir``."""
    import mlflow

    from tasks.models.files import load_model_file

    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch)
        keras_files = sorted(Path(local).rglob("*.keras"))
        if not keras_files:
            raise TransferWeightsError(f"model.weights={uri}: the version holds no .keras model")
        try:
            model = load_model_file(keras_files[0])
        except ModelFileError as error:
            raise TransferWeightsError(f"model.weights={uri}: {error}") from None
    found = _find_base(model)
    if found is None:
        raise TransferWeightsError(
            f"model.weights={uri} has no layer named 'base' (not a transfer model): register "
            "a model trained with model.name=transfer, or use imagenet or a .weights.h5 file"
        )
    backbone, owner = found
    reference = _application(base, tuple(backbone.input_shape[1:]))
    if _architecture(backbone) != _architecture(reference):
        kind = owner.name.removeprefix("transfer_")  # transfer_model names it transfer_<base>
        fix = f"set model.base={kind}" if kind in BASES else "register a matching model"
        raise TransferWeightsError(
            f"model.weights={uri} holds a {kind} base ({len(backbone.layers)} layers), not the "
            f"{base} that model.base asks for: {fix}, or pick another version"
        )
    dest = Path(dest_dir) if dest_dir else Path(tempfile.mkdtemp(prefix="transfer-weights-"))
    dest.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.@-]+", "-", uri.removeprefix("models:/"))
    path = dest / f"{base}-{slug}.weights.h5"
    backbone.save_weights(path)
    return str(path)
