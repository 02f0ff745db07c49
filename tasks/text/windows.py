"""Next-token examples cut online from a token stream: the text counterpart of augment.py.

Example i of a stream is (tokens[i : i + L], tokens[i + L]) for L = data.text.sequence_length,
so a stream of T tokens gives T - L examples and nothing but the stream is stored.
Training order is a permutation that is a function of (seed, epoch), like the image
pipeline's, so a run resumed from a checkpoint sees the batches an unbroken run would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.errors import DataFileError
from tasks.training.distribute import Shard, steps_per_epoch

if TYPE_CHECKING:
    import tensorflow as tf


def example_count(tokens: np.ndarray, sequence_length: int) -> int:
    return max(0, len(tokens) - sequence_length)


def check_length(splits: dict[str, np.ndarray], sequence_length: int) -> None:
    """Every split needs at least one window: name the param when it does not."""
    for name, tokens in splits.items():
        if example_count(tokens, sequence_length) == 0:
            raise DataFileError(
                f"data.text.sequence_length {sequence_length} is not shorter than the "
                f"{name} split ({len(tokens)} tokens): lower it or use more text"
            )


def windows(tokens: np.ndarray, sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """All (context, next token) examples of a stream, in order, as arrays (a strided
    view: no copy of the contexts)."""
    count = example_count(tokens, sequence_length)
    contexts = np.lib.stride_tricks.sliding_window_view(tokens, sequence_length)[:count]
    return contexts, tokens[sequence_length:].astype(np.int64)


def windows_dataset(
    tokens: np.ndarray,
    sequence_length: int,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: Any = None,
    shard: Shard | None = None,
) -> tf.data.Dataset:
    """Batches of (int32 contexts (B, L), int32 next tokens (B,)) for Keras.

    ``train``: order reshuffled every epoch as a function of (seed, epoch) (``epoch``, an
    int64 tf.Variable a callback sets, as for images); else stream order. ``shard``: this
    replica's chunks under tf.distribute (tasks/training/distribute.py).
    """
    import tensorflow as tf

    from tasks.training.distribute import index_batches

    shard = shard or Shard()
    count = example_count(tokens, sequence_length)
    steps = len(shard.chunk_ids(steps_per_epoch(count, batch_size, shard.replicas)))
    with tf.device(shard.device if shard.dali_device_id is None else "/cpu:0"):
        stream = tf.constant(np.asarray(tokens, dtype=np.int32))
        offsets = tf.range(sequence_length, dtype=tf.int64)
        batches = index_batches(count, batch_size, seed if train else None, epoch, shard)
        dataset = batches.map(
            lambda i: (
                tf.gather(stream, i[:, None] + offsets),
                tf.gather(stream, i + sequence_length),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        ).prefetch(2)
        return dataset.apply(tf.data.experimental.assert_cardinality(steps))
