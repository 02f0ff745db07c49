"""Training-recipe settings reach the model itself, not just the config."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tasks.config import load_config
from tasks.stages.train import build_for_training
from tasks.training import recipe
from tests.helpers.project import PARAMS


def fast_cfg(tmp_path, **train):
    overrides = {"model.name": "fast_cnn", "model.widths": [8, 16, 16]}
    overrides |= {f"train.{key}": value for key, value in train.items()}
    return load_config(PARAMS, overrides)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16", "float32"])
def test_precision_policy_reaches_the_layers(tmp_path, policy):
    model = build_for_training(fast_cfg(tmp_path, precision=policy), (28, 28, 1), 10, steps=10)
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.dtype_policy.name == policy
    assert model.get_layer("logits").compute_dtype == "float32"  # loss in full precision
    assert keras.config.dtype_policy().name == "float32", "global policy must be restored"
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (policy == "mixed_float16")
    x = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype("float32")
    model.fit(x, np.arange(8) % 10, epochs=1, verbose=0)  # trains under the policy on CPU


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_fast_cnn_activation_reaches_every_hidden_layer(tmp_path, activation):
    cfg = load_config(
        PARAMS,
        {"model.name": "fast_cnn", "model.widths": [8, 16, 16], "model.activation": activation},
    )
    model = build_for_training(cfg, (28, 28, 1), 10, steps=10)
    used = {
        layer.activation.__name__
        for layer in model.layers
        if isinstance(layer, keras.layers.Activation)
    }
    assert used == {activation}
    assert cfg.flat()["model.activation"] == activation  # logged with the run's params


@pytest.mark.parametrize(("setting", "expected"), [(True, True), (False, False), ("auto", False)])
def test_xla_setting_reaches_compile(tmp_path, setting, expected):
    from tensorflow.python.framework.config import is_op_determinism_enabled

    model = build_for_training(fast_cfg(tmp_path, xla=setting), (28, 28, 1), 10, steps=10)
    assert model.jit_compile is expected  # "auto" is off on this CPU-only machine
    # Keras drops XLA under op determinism: XLA runs trade bit-reproducibility for it.
    assert is_op_determinism_enabled() is not expected


def test_auto_settings_pick_by_device():
    assert recipe.resolve_precision("auto", "gpu") == "mixed_bfloat16"
    assert recipe.resolve_precision("auto", "cpu") == "float32"
    assert recipe.resolve_precision("mixed_float16", "cpu") == "mixed_float16"
    assert recipe.resolve_xla("auto", "gpu") is True
    assert recipe.resolve_xla("auto", "cpu") is False


def test_sgd_recipe_has_nesterov_decay_ema_and_schedule(tmp_path):
    cfg = fast_cfg(
        tmp_path,
        optimizer="sgd",
        learning_rate=0.2,
        weight_decay=5e-4,
        schedule="warmup_linear",
        warmup_fraction=0.2,
        weight_averaging=True,
        epochs=2,
    )
    optimizer = recipe.make_optimizer(cfg.train, steps_per_epoch=50)
    assert isinstance(optimizer, keras.optimizers.SGD) and optimizer.nesterov
    assert optimizer.use_ema and optimizer.weight_decay == pytest.approx(5e-4)
    schedule = optimizer._learning_rate
    rates = [float(schedule(step)) for step in (0, 10, 20, 60, 100, 120)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.1, 0.0, 0.0])


def test_label_smoothing_loss_matches_the_definition():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype="float32")
    labels = np.array([0, 2])
    loss = recipe.sparse_smoothed_crossentropy(0.3)(labels, logits)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    target = np.eye(3)[labels] * 0.7 + 0.1
    np.testing.assert_allclose(np.asarray(loss), -(target * log_p).sum(axis=1), rtol=1e-5)
