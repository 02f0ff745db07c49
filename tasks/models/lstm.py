"""The seed's language model: Embedding -> LSTM -> Dense over the vocabulary.

It reads ``sequence_length`` token ids and outputs logits for the next token. The LSTM
layers keep Keras' default activations (tanh, sigmoid), no recurrent dropout and
unroll=False: those are the conditions under which Keras runs them on NVIDIA's cuDNN
kernel on a GPU (several times faster than the generic loop). Dropout therefore sits
between layers as its own layer, never inside the LSTM.
"""

from __future__ import annotations

from typing import Any


def lstm_language_model(
    sequence_length: int,
    vocab_size: int,
    *,
    embedding_dim: int = 128,
    units: int = 128,
    layers: int = 1,
    dropout: float = 0.0,
) -> Any:
    import keras
    from keras import layers as kl

    tokens = keras.Input(shape=(sequence_length,), dtype="int32", name="tokens")
    x = kl.Embedding(vocab_size, embedding_dim, name="embedding")(tokens)
    for depth in range(layers):
        last = depth == layers - 1
        x = kl.LSTM(units, return_sequences=not last, name=f"lstm_{depth + 1}")(x)
        if dropout:
            x = kl.Dropout(dropout, name=f"dropout_{depth + 1}")(x)
    # float32 logits even under a mixed-precision policy: the loss stays in full precision.
    logits = kl.Dense(vocab_size, dtype="float32", name="next_token_logits")(x)
    return keras.Model(tokens, logits, name="lstm_lm")
