"""The one preprocessing/augmentation path: DALI pipelines fed from uint8 arrays in memory.

Train: random translate (zero-pad ``pad`` px, crop back to HxW at an integer offset drawn
uniformly from [-pad, pad] per axis), random horizontal flip, per-channel normalize, then
with probability ``erase_prob`` a random erasure (Cutout: an ``erase_size`` px square centred
on a uniformly drawn pixel, clipped at the borders, set to the channel mean, i.e. 0 after
normalizing).
Eval: normalize only. The data stays uint8 until DALI (airbench's data path): we never
store or cache augmented images. A model whose input differs from the data (a transfer
base wants e.g. 96x96 RGB, the data is 28x28 gray) gets ``input_shape``: after the
translate, which stays at the data's resolution, DALI resizes to the model's HxW and
repeats a gray channel three times; mean/std then have one value per model channel.

Keras consumes `dali_dataset`, a `tf.data.Dataset` built with the DALI TensorFlow plugin
(`DALIDatasetWithInputs`); on a GPU its batches are produced on, and stay on, the GPU.
tasks/images/reference.py is the same transform in NumPy, for tests and as a benchmark baseline.

Facts about the plugin this module relies on (measured with DALI 2.4 / TF 2.21, CPU):

* With finite inputs, DALIDatasetWithInputs ends by itself once an input is exhausted,
  after yielding every batch already inside DALI: one pass = ceil(N / batch) batches,
  last one partial. Keras re-iterates it each epoch (`fit(epochs=k)`, no steps_per_epoch).
* Every new iterator (each epoch) builds a fresh DALI pipeline from the same serialized
  pipeline and seed, so the k-th batch of every epoch draws the *same* offsets and flips.
  Because the order is reshuffled each epoch, image i still gets a fresh draw each epoch.
* The plugin opens one iterator per input dataset. Two inputs derived from *one* shuffled
  dataset get *different* permutations (tf.data reshuffles per iterator), which silently
  misaligns images and labels. Each input therefore gets its own, identically seeded,
  shuffle: their k-th iterators produce the same permutation.
* The plugin assumes input tensors live on the device the dataset is placed on. TF keeps
  int32 tensors in host memory even on a GPU, so labels enter DALI as int64 and are cast
  to int32 inside the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tasks.config import PreprocessConfig
from tasks.images.feeding import NormStats
from tasks.training.device import resolve_device
from tasks.training.distribute import Shard, index_batches, steps_per_epoch
from tasks.workspace import atomic_path

if TYPE_CHECKING:
    import tensorflow as tf
    from nvidia.dali.pipeline import Pipeline

_STATS_CHUNK = 4096  # images per chunk in channel_stats: 4096 CIFAR images ~ 100 MB float64


def channel_stats(images: np.ndarray) -> NormStats:
    """Per-channel mean and population std of uint8 NHWC images, in pixel units.

    Sums run in float64 over chunks, so 50k CIFAR images never exist as one float array;
    float64 sums of uint8 values and their squares are exact at this size (< 2**53).
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
    channels = images.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(images), _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].reshape(-1, channels).astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = images.size // channels
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    return NormStats(mean=mean.tolist(), std=np.sqrt(var).tolist())


# --------------------------------------------------------------------------- DALI graphs


class _Reshape(NamedTuple):
    """How the data becomes the model's input: resize to ``size`` (H, W; None: keep), and
    repeat a single gray channel as RGB."""

    size: tuple[int, int] | None
    gray_to_rgb: bool


def reshape_for(data_shape: tuple[int, ...], input_shape: tuple[int, int, int] | None) -> _Reshape:
    """The reshape from ``data_shape`` (H, W, C) to the model's ``input_shape`` (None: same)."""
    if input_shape is None:
        return _Reshape(None, False)
    if len(data_shape) != 3:
        raise ValueError(f"expected HWC images, got image shape {tuple(data_shape)}")
    height, width, channels = input_shape
    data_channels = data_shape[2]
    if channels != data_channels and (data_channels, channels) != (1, 3):
        raise ValueError(
            f"the model takes {channels} channels, the data has {data_channels}: only "
            "1 (gray) -> 3 (RGB) is converted; build the model for the data's channels"
        )
    size = None if (height, width) == tuple(data_shape[:2]) else (height, width)
    return _Reshape(size, channels != data_channels)


def _output_shape(data_shape: tuple[int, ...], input_shape: tuple[int, int, int] | None):
    """(H, W, C) of what the pipeline yields: the model's input shape, or the data's."""
    return tuple(input_shape) if input_shape is not None else tuple(data_shape)


def _check_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean/std need one value per channel ({channels}), got {len(mean)} and {len(std)}"
        )
    if min(std) <= 0:
        raise ValueError(f"std must be positive in every channel, got {list(std)}")


def _inputs(device: str, sources: tuple[object, object] | None):
    """External sources "images" (uint8 HWC) and "labels" (int64; see module docstring).

    ``sources=None`` leaves them as placeholders for DALIDatasetWithInputs.
    """
    from nvidia.dali import fn, types

    # cycle="raise": StopIteration at the end of each epoch, restart after pipe.reset().
    image_src, label_src = sources or (None, None)
    feed = {"cycle": "raise"} if sources else {}
    images = fn.external_source(
        image_src, name="images", device=device, layout="HWC", dtype=types.UINT8, **feed
    )
    labels = fn.external_source(label_src, name="labels", device=device, dtype=types.INT64, **feed)
    return images, fn.cast(labels, dtype=types.INT32)


def _to_model_input(images, reshape: _Reshape | None):
    """Resize and/or expand gray to RGB (unchanged graph when neither is needed)."""
    from nvidia.dali import fn, types

    if reshape is None:
        return images
    if reshape.size is not None:
        # DALI's linear resize samples at pixel centers, (i + 0.5) * in / out - 0.5, like
        # keras.layers.Resizing / tf.image.resize "bilinear": on 64 random images they agree
        # to 7.6e-4 px at most (28->32 and 28->224 exactly, 32->96 6.3e-4; float rounding).
        # Downscaling: DALI's default antialias widens the filter to the scale factor, which
        # no Keras layer reproduces (7.7 px apart from tf.image.resize(antialias=True) at
        # 32->24); without it DALI interpolates the 2x2 nearest pixels like Keras' bilinear
        # Resizing (antialias=False; 7.1e-4 px at 32->24, exact at 96->32), so the
        # registered model (models.with_normalization) resizes as training did, at the
        # price of aliasing when shrinking by 2x or more. Upscaling ignores antialias.
        # Output float: uint8 would round every pixel before normalization.
        images = fn.resize(
            images,
            size=list(reshape.size),
            interp_type=types.INTERP_LINEAR,
            antialias=False,
            dtype=types.FLOAT,
        )
    if reshape.gray_to_rgb:
        images = fn.cat(images, images, images, axis=2)  # HWC: C is axis 2
    return images


def _normalize(images, mirror, mean: Sequence[float], std: Sequence[float]):
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        images,
        mirror=mirror,
        mean=list(mean),
        std=list(std),
        dtype=types.FLOAT,
        output_layout="HWC",
    )


def _train_graph(
    device: str,
    sources: tuple[object, object] | None,
    shape: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    pad: int,
    flip_prob: float,
    reshape: _Reshape | None = None,
    erase_prob: float = 0.0,
    erase_size: int = 0,
):
    """Random translate by zero-pad + crop (at the data's size), resize / gray to RGB for
    the model, random horizontal flip, normalize, random erasure."""
    from nvidia.dali import fn, types

    height, width = shape
    images, labels = _inputs(device, sources)
    if pad > 0:
        # Integer anchor in [-pad, pad] (y, x); out-of-bounds reads become 0 = zero padding.
        # crop_mirror_normalize's own crop can't do this: with crop == image size it never
        # shifts, and a continuous crop_pos over a pre-padded image gives non-uniform offsets.
        anchor = fn.random.uniform(values=list(range(-pad, pad + 1)), shape=[2], dtype=types.INT32)
        images = fn.slice(
            images,
            start=anchor,
            shape=[height, width],
            axis_names="HW",
            out_of_bounds_policy="pad",
            fill_values=0,
        )
    images = _to_model_input(images, reshape)
    flip = fn.random.coin_flip(probability=flip_prob)
    images = _normalize(images, flip, mean, std)
    if erase_prob > 0 and erase_size > 0:
        out_shape = reshape.size if reshape is not None and reshape.size else shape
        images = _random_erase(images, out_shape, erase_prob, erase_size)
    return images, labels


def _random_erase(images, shape: tuple[int, int], probability: float, size: int):
    """Cutout on normalized HWC images: with ``probability``, zero (the channel mean) a
    ``size`` x ``size`` square centred on a uniform pixel, clipped to the image. Integer
    pixel bounds, so `reference.augment_reference` can redo it exactly."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    corners = []
    for extent in shape:
        centre = fn.random.uniform(values=list(range(extent)), dtype=types.INT32)
        start = centre - size // 2
        corners.append((dmath.max(start, 0), dmath.min(start + size, extent)))
    on = fn.random.coin_flip(probability=probability, dtype=types.INT32)
    anchor = fn.stack(*(low for low, _ in corners))
    extent = fn.stack(*((high - low) * on for low, high in corners))
    return fn.erase(
        images,
        anchor=fn.cast(anchor, dtype=types.FLOAT),
        shape=fn.cast(extent, dtype=types.FLOAT),
        axis_names="HW",
        fill_value=0.0,
    )


def _eval_graph(
    device: str,
    sources: tuple[object, object] | None,
    shape: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    reshape: _Reshape | None = None,
):
    """Resize / gray to RGB for the model, normalize; ``shape`` is unused but keeps both
    graphs' signatures alike."""
    images, labels = _inputs(device, sources)
    return _normalize(_to_model_input(images, reshape), 0, mean, std), labels


def _pipeline(
    graph, *, batch_size: int, num_threads: int, device: str, seed: int, gpu: int = 0, **kwargs
):
    from nvidia.dali import Pipeline

    # Without CUDA, DALI needs device_id=None explicitly, even for an all-CPU pipeline.
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=gpu if device == "gpu" else None,
        seed=seed,
    )
    with pipe:
        pipe.set_outputs(*graph(device, **kwargs))
    return pipe


class _Batches:
    """Re-iterable source: consecutive batches of ``array``, last one partial, then stop."""

    def __init__(self, array: np.ndarray, batch_size: int):
        self.array, self.batch_size = array, batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.array), self.batch_size):
            yield self.array[start : start + self.batch_size]


def _array_sources(images: np.ndarray, labels: np.ndarray, batch_size: int):
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    labels64 = np.ascontiguousarray(labels, dtype=np.int64)
    return _Batches(np.ascontiguousarray(images), batch_size), _Batches(labels64, batch_size)


def build_train_pipeline(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    pad: int,
    flip_prob: float,
    seed: int,
    device: str,
    num_threads: int,
    input_shape: tuple[int, int, int] | None = None,
    erase_prob: float = 0.0,
    erase_size: int = 0,
) -> Pipeline:
    """DALI train pipeline over ``images``/``labels`` in the given order, for `pipe.run()`.

    One epoch = ceil(N / batch_size) runs; then run() raises StopIteration and the pipeline
    needs reset(). Outputs: float32 NHWC normalized images (of ``input_shape``, the model's
    (H, W, C), when given), int32 labels. Augmentation is a function of ``seed``. (Keras
    uses `dali_dataset`, which shuffles; this one does not.)
    """
    reshape = reshape_for(images.shape[1:], input_shape)
    _check_stats(mean, std, _output_shape(images.shape[1:], input_shape)[2])
    return _pipeline(
        _train_graph,
        batch_size=batch_size,
        num_threads=num_threads,
        device=device,
        seed=seed,
        sources=_array_sources(images, labels, batch_size),
        shape=images.shape[1:3],
        mean=mean,
        std=std,
        pad=pad,
        flip_prob=flip_prob,
        reshape=reshape,
        erase_prob=erase_prob,
        erase_size=erase_size,
    )


def build_eval_pipeline(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: str,
    num_threads: int,
    input_shape: tuple[int, int, int] | None = None,
) -> Pipeline:
    """DALI eval pipeline: normalize only (after resizing to ``input_shape``, the model's
    (H, W, C), when given), data order kept, last partial batch kept."""
    reshape = reshape_for(images.shape[1:], input_shape)
    _check_stats(mean, std, _output_shape(images.shape[1:], input_shape)[2])
    return _pipeline(
        _eval_graph,
        batch_size=batch_size,
        num_threads=num_threads,
        device=device,
        seed=0,  # no random operators
        sources=_array_sources(images, labels, batch_size),
        shape=images.shape[1:3],
        mean=mean,
        std=std,
        reshape=reshape,
    )


def iterate_numpy(pipe: Pipeline) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run a pipeline from `build_*_pipeline` for one epoch, yielding NumPy (images, labels).

    Resets the pipeline at the end, so calling it again gives the next epoch.
    """
    while True:
        try:
            outputs = pipe.run()
        except StopIteration:
            pipe.reset()
            return
        yield tuple(_as_numpy(out) for out in outputs)


def _as_numpy(tensor_list) -> np.ndarray:
    if hasattr(tensor_list, "as_cpu"):  # TensorListGPU
        tensor_list = tensor_list.as_cpu()
    return tensor_list.as_array()


# ------------------------------------------------------------------ tf.data for Keras


def dali_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    stats: NormStats | tuple[Sequence[float], Sequence[float]],
    batch_size: int,
    train: bool,
    preprocess: PreprocessConfig,
    seed: int = 0,
    epoch: Any = None,
    input_shape: tuple[int, int, int] | None = None,
    shard: Shard | None = None,
) -> tf.data.Dataset:
    """Batches of (float32 NHWC normalized images, int32 labels) for Keras fit/evaluate/predict.

    One iteration is one pass over the data: ceil(N / batch_size) batches, the last one
    partial. ``train=True``: augmented (preprocess.pad/flip_prob), order reshuffled every
    epoch; batches and augmentation are reproducible from ``seed`` (and TF's global seed,
    which `keras.utils.set_random_seed` sets). ``train=False``: normalized only, input
    order, so predictions line up with ``labels``. preprocess.device picks CPU or GPU.
    ``epoch``: for Keras training, an int64 `tf.Variable` a callback sets to the current
    epoch (see train.train_model): the order is then a function of (seed, epoch), so a
    run resumed at epoch k sees the batches an unbroken one would. Without it each pass
    over the dataset is the next epoch. ``input_shape``: the model's (H, W, C) when it
    differs from the data's (resized, gray repeated as RGB; ``stats`` per model channel).
    ``shard``: the chunks of each pass this pipeline yields, its device and seed, under
    tf.distribute (tasks/training/distribute.py); by default every batch, on the first device.
    """
    import tensorflow as tf
    from nvidia.dali.plugin import tf as dali_tf

    mean, std = stats
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"expected uint8 NHWC images and one label each, got {images.shape}")
    reshape = reshape_for(images.shape[1:], input_shape)
    out_height, out_width, out_channels = _output_shape(images.shape[1:], input_shape)
    _check_stats(mean, std, out_channels)
    device = resolve_device(preprocess.device)
    n, height, width, _ = images.shape
    shard = shard or Shard(device="/gpu:0" if device == "gpu" else "/cpu:0")
    # DALI on a GPU runs on the replica's GPU; on the CPU, on the replica's logical CPU
    # device (mirrored without GPUs) or the host's.
    dali_device = (
        shard.device if (device == "gpu") == (shard.dali_device_id is not None) else "/cpu:0"
    )
    host = "/cpu:0" if device == "gpu" else dali_device

    with tf.device(host):
        images_t = tf.constant(images)
        labels_t = tf.constant(np.asarray(labels, dtype=np.int64))
        shuffle_seed = seed if train else None
        # One index dataset per input, identically seeded: see the module docstring.
        image_ds = index_batches(n, batch_size, shuffle_seed, epoch, shard)
        label_ds = index_batches(n, batch_size, shuffle_seed, epoch, shard)
        image_ds = image_ds.map(lambda i: tf.gather(images_t, i))
        label_ds = label_ds.map(lambda i: tf.gather(labels_t, i))
        if device == "gpu":
            # The plugin reads inputs from the dataset's own device; batches cross once here.
            image_ds = image_ds.apply(tf.data.experimental.copy_to_device(dali_device))
            label_ds = label_ds.apply(tf.data.experimental.copy_to_device(dali_device))

    graph_args = {
        "sources": None,
        "shape": (height, width),
        "mean": mean,
        "std": std,
        "reshape": reshape,
    }
    if train:
        graph_args |= {
            "pad": preprocess.pad,
            "flip_prob": preprocess.flip_prob,
            "erase_prob": preprocess.erase_prob,
            "erase_size": preprocess.erase_size,
        }
    pipe = _pipeline(
        _train_graph if train else _eval_graph,
        batch_size=batch_size,
        num_threads=preprocess.num_threads,
        device=device,
        seed=shard.seed(seed),  # the permutation above uses the run's seed on every shard
        gpu=shard.dali_device_id or 0,
        **graph_args,
    )
    with tf.device(dali_device):
        dataset = dali_tf.experimental.DALIDatasetWithInputs(
            pipeline=pipe,
            input_datasets={
                "images": dali_tf.experimental.Input(image_ds, batch=True, layout="HWC"),
                "labels": dali_tf.experimental.Input(label_ds, batch=True),
            },
            batch_size=batch_size,
            output_dtypes=(tf.float32, tf.int32),
            output_shapes=((None, out_height, out_width, out_channels), (None,)),
            num_threads=preprocess.num_threads,
            device_id=shard.dali_device_id if device == "gpu" else None,
        )
        # Lets Keras size its progress bar, and fails loudly if a pass ever has a
        # different number of batches.
        steps = len(shard.chunk_ids(steps_per_epoch(n, batch_size, shard.replicas)))
        return dataset.apply(tf.data.experimental.assert_cardinality(steps))


# ------------------------------------------------------------ reference and samples


def sample_augmented(
    images: np.ndarray,
    stats: NormStats | tuple[Sequence[float], Sequence[float]],
    preprocess: PreprocessConfig,
    n: int,
    seed: int,
    input_shape: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Augment ``images[:n]`` (in order, so ``labels[:n]`` match) with the DALI train pipeline.

    Returns float32 NHWC normalized images, as the model (of ``input_shape``) sees them.
    """
    mean, std = stats
    subset = images[:n]
    pipe = build_train_pipeline(
        subset,
        np.zeros(len(subset), dtype=np.int64),
        mean=mean,
        std=std,
        batch_size=len(subset),
        pad=preprocess.pad,
        flip_prob=preprocess.flip_prob,
        erase_prob=preprocess.erase_prob,
        erase_size=preprocess.erase_size,
        seed=seed,
        device=resolve_device(preprocess.device),
        num_threads=preprocess.num_threads,
        input_shape=input_shape,
    )
    batch, _ = next(iterate_numpy(pipe))
    return batch


def save_image_grid(
    batch_normalized: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    path: Path,
    class_names: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
) -> None:
    """Write a PNG grid of normalized NHWC images, de-normalized back to pixels.

    Uses a bare Agg `Figure` (no pyplot, no global backend state), written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pixels = batch_normalized * np.asarray(std, dtype=np.float32) + np.asarray(mean, np.float32)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    count = len(pixels)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(1.3 * cols, 1.4 * rows))
    FigureCanvasAgg(fig)
    for i, ax in enumerate(fig.subplots(rows, cols, squeeze=False).ravel()):
        ax.axis("off")
        if i >= count:
            continue
        image = pixels[i]
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        if labels is not None:
            label = int(labels[i])
            ax.set_title(class_names[label] if class_names else str(label), fontsize=7)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
