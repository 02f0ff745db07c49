"""How a model is trained: optimizer, learning-rate schedule, loss, precision, XLA.

The pieces of the fast recipe (after Page's ResNet-9 "bag of tricks" and Keller
Jordan's airbench): Nesterov SGD with decoupled weight decay, linear warmup then
linear decay to zero, label smoothing, an exponential moving average of the weights
(Keras' optimizer ``use_ema``, swapped in when training ends). The seed CNN's recipe
(Adam, constant rate, no smoothing) is the same code with those knobs off.
"""

from __future__ import annotations

from typing import Any

from tasks.config import TrainConfig


def resolve_precision(setting: str, device: str) -> str:
    """``auto``: bfloat16 compute on a GPU (tensor cores, no loss scaling needed), float32
    on CPU, where these cores lack native bf16 and mixed precision only adds casts."""
    if setting != "auto":
        return setting
    return "mixed_bfloat16" if device == "gpu" else "float32"


def resolve_xla(setting: bool | str, device: str) -> bool:
    """``auto``: XLA on a GPU (fused kernels); off on CPU, where a one-off comparison on
    the project's 2-core machine ran these small convnets at about half the speed with it
    (not part of BENCHMARKS.md)."""
    return device == "gpu" if setting == "auto" else bool(setting)


def learning_rate(cfg: TrainConfig, steps_per_epoch: int, replicas: int = 1) -> Any:
    """A float for ``constant``; a warmup-then-linear-decay schedule otherwise.

    ``lr_scaling: linear`` (Goyal et al., "Accurate, Large Minibatch SGD"): the rate is
    multiplied by the replicas in sync, since the global batch grows with them, and is
    reached by a linear warmup over ``warmup_fraction`` of the steps (then held, for
    ``constant``).
    """
    scaled = cfg.lr_scaling == "linear" and replicas > 1
    peak = cfg.learning_rate * (replicas if scaled else 1)
    if cfg.schedule == "constant" and not scaled:
        return peak
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_fraction * total)
    return warmup_linear_decay(peak, total, warmup, decay=cfg.schedule != "constant")


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int, replicas: int = 1) -> Any:
    import keras

    common = {
        "learning_rate": learning_rate(cfg, steps_per_epoch, replicas),
        "weight_decay": cfg.weight_decay or None,
        "use_ema": cfg.weight_averaging,
        "ema_momentum": cfg.ema_momentum,
    }
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=cfg.momentum, nesterov=True, **common)
    return keras.optimizers.Adam(**common)  # Keras 3 decouples weight_decay in every optimizer


def sparse_smoothed_crossentropy(label_smoothing: float) -> Any:
    """Cross-entropy from logits against integer labels, with label smoothing.

    Keras' sparse loss has no smoothing and the dense one needs one-hot labels from
    the input pipeline; this keeps DALI's int32 labels and smooths inside the loss.
    """
    import keras
    from keras import ops

    if label_smoothing == 0.0:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(labels: Any, logits: Any) -> Any:
        classes = ops.shape(logits)[-1]
        one_hot = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), classes)
        target = one_hot * (1.0 - label_smoothing) + label_smoothing / ops.cast(classes, "float32")
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        return -ops.sum(target * log_probs, axis=-1)

    return loss


def compile_model(
    model: Any, cfg: TrainConfig, steps_per_epoch: int, xla: bool, replicas: int = 1
) -> Any:
    import keras

    model.compile(
        optimizer=make_optimizer(cfg, steps_per_epoch, replicas),
        loss=sparse_smoothed_crossentropy(cfg.label_smoothing),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=xla,
    )
    return model


def warmup_linear_decay(
    peak: float, total_steps: int, warmup_steps: int, decay: bool = True
) -> Any:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then linear decay to 0
    (or ``peak`` held, without ``decay``)."""
    import keras
    from keras import ops

    class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step: Any) -> Any:
            step = ops.cast(step, "float32")
            rising = step / max(warmup_steps, 1)
            falling = (total_steps - step) / max(total_steps - warmup_steps, 1) if decay else 1.0
            return peak * ops.maximum(0.0, ops.where(step < warmup_steps, rising, falling))

        def get_config(self) -> dict:
            return {
                "peak": peak,
                "total_steps": total_steps,
                "warmup_steps": warmup_steps,
                "decay": decay,
            }

    return WarmupLinearDecay()
