"""Training says how far it is inside an epoch, not only at its end."""

from __future__ import annotations

import re

import numpy as np


def test_progress_lines_inside_an_epoch_count_steps_rate_and_eta(capsys):
    import keras

    from tasks.training.progress import epoch_progress

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((10, 3), "float32"), np.zeros((10, 2), "float32")
    progress = epoch_progress(steps=5, global_batch=2, epochs=2, every_s=0)
    model.fit(x, y, batch_size=2, epochs=2, callbacks=[progress], verbose=0)
    lines = [line for line in capsys.readouterr().out.splitlines() if "steps" in line]
    assert len(lines) == 10, lines  # every step, as every_s=0 asks
    assert re.fullmatch(r"  epoch 1/2: 1/5 steps, [\d,]+ img/s, ETA \d+ s", lines[0]), lines[0]
    assert lines[-1].startswith("  epoch 2/2: 5/5 steps") and lines[-1].endswith("ETA 0 s")


def test_no_progress_line_before_its_interval(capsys):
    import keras

    from tasks.training.progress import epoch_progress

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((10, 3), "float32"), np.zeros((10, 2), "float32")
    model.fit(x, y, batch_size=2, callbacks=[epoch_progress(5, 2, 1, every_s=3600)], verbose=0)
    assert "steps" not in capsys.readouterr().out
