"""Pure pieces of the evaluate and register stages, and atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from flows.reproduce.rules import class_f1_metrics
from tasks.images.evaluate import compute_metrics
from tasks.tracking.registry import should_promote
from tasks.workspace import atomic_path


def test_compute_metrics_matches_hand_computed_values():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.5]])
    labels = np.array([0, 1, 1, 1])  # predictions: 0, 1, 0, 0
    metrics = compute_metrics(logits, labels, ["cat", "dog"])
    assert metrics["test"]["accuracy"] == pytest.approx(0.5)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = -np.mean(log_softmax[np.arange(4), labels])
    assert metrics["test"]["loss"] == pytest.approx(expected_loss)
    cat, dog = metrics["per_class"]["cat"], metrics["per_class"]["dog"]
    assert cat["precision"] == pytest.approx(1 / 3) and cat["recall"] == pytest.approx(1.0)
    assert dog["precision"] == pytest.approx(1.0) and dog["recall"] == pytest.approx(1 / 3)
    assert dog["support"] == 3
    # reproduce compares per-class F1 under the names runs once logged as metrics
    assert class_f1_metrics({"a cat": cat, "dog": dog}) == {
        "per_class/f1_a_cat": cat["f1"],
        "per_class/f1_dog": dog["f1"],
    }


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "expected"),
    [
        (0.5, None, 0.0, True),  # no champion yet
        (0.71, 0.70, 0.0, True),
        (0.70, 0.70, 0.0, False),  # a tie does not churn the alias
        (0.69, 0.70, 0.0, False),
        (0.705, 0.70, 0.01, False),  # better, but by less than the margin
        (0.72, 0.70, 0.01, True),
    ],
)
def test_promotion_rule(candidate, champion, margin, expected):
    assert should_promote(candidate, champion, margin) is expected


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    with atomic_path(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
