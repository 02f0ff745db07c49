"""How good a language model is: next-token loss, perplexity, top-1/top-5 accuracy, and the
perplexity of a unigram model on the same test tokens (what the LSTM must beat: a model
that ignores the context entirely)."""

from __future__ import annotations

import numpy as np


def unigram_probabilities(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token frequencies of the training split with add-one smoothing (every id but
    padding gets at least one count), so no test token has probability zero."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64)[:vocab_size]
    counts[1:] += 1.0
    counts[0] = 0.0  # padding is never a token of the text
    return counts / counts.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def language_metrics(
    logits: np.ndarray, targets: np.ndarray, unigram: np.ndarray
) -> dict[str, float]:
    """Headline test metrics; ``accuracy`` is top-1 next-token accuracy (the number the
    registry compares, as for images)."""
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64))
    rows = np.arange(len(targets))
    loss = float(-log_probs[rows, targets].mean())
    top5 = np.argsort(-log_probs, axis=1)[:, :5]
    unigram_loss = float(-np.log(unigram[targets]).mean())
    return {
        "accuracy": float((log_probs.argmax(axis=1) == targets).mean()),
        "top5_accuracy": float((top5 == targets[:, None]).any(axis=1).mean()),
        "loss": loss,
        "perplexity": float(np.exp(loss)),
        "unigram_perplexity": float(np.exp(unigram_loss)),
        # < 1: the model beats the unigram baseline; 0.5 = half its perplexity.
        "perplexity_vs_unigram": float(np.exp(loss - unigram_loss)),
    }
