"""The LSTM language model (data.source: text, model.name: lstm_lm): its data, its
examples, bad input, and the whole pipeline under the real `dvc repro` on a text that
ships with the OS (/usr/share/common-licenses)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import copy_repo, set_params
from tasks.config import load_config
from tasks.errors import DataFileError
from tasks.text import data as text_data
from tasks.text import metrics, windows
from tasks.workspace import Workspace
from tests.helpers.project import (
    PARAMS,
    TINY,
    dvc_repro,
    experiment_of,
    pipeline_env,
    read_mlflow,
    stages_run,
)
from tests.helpers.readme import check_quiet, check_result

LICENSES = Path("/usr/share/common-licenses")
TEXT = {
    "data.source": "text",
    "data.name": "licenses",
    "model.name": "lstm_lm",
    "model.units": 64,
    "model.embedding_dim": 64,
    "data.text.vocab_size": 400,
    "train.epochs": 3,
    "train.learning_rate": 0.003,
    "evaluate.generate_tokens": 6,
}


def text_cfg(tmp_path: Path, **overrides):
    return load_config(PARAMS, TEXT | overrides)


def test_the_corpus_splits_by_position_and_fits_the_vocabulary_on_train_only(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 40 + "\n")
    (tmp_path / "b.txt").write_text("delta epsilon zeta eta theta iota kappa " * 3)
    cfg = text_cfg(tmp_path, **{"data.text.path": str(tmp_path), "data.text.vocab_size": 5})
    ds = text_data.prepare_text(cfg.data, tmp_path)
    # Train is the first 80% of the text: a.txt only, so b.txt's words are [UNK] (id 1).
    assert set(ds.vocabulary) == {"", "[UNK]", "alpha", "beta", "gamma"}
    assert set(ds.test.tolist()) == {1}
    assert ds.counts["train"] > ds.counts["val"] > 0 and ds.counts["test"] > 0
    whole = cfg.data.text.model_copy(update={"level": "character", "vocab_size": 10})
    chars = text_data.prepare_text(cfg.data.model_copy(update={"text": whole}), tmp_path)
    assert " " in chars.vocabulary and "a" in chars.vocabulary


@pytest.mark.parametrize(
    ("content", "overrides", "named"),
    [
        (b"", {}, "holds no text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, "binary"),
        (b"caf\xe9 au lait " * 50, {}, "not UTF-8"),
        (
            b"one two three four five six " * 30,
            {"data.text.vocab_size": 50},
            "data.text.vocab_size",
        ),
    ],
)
def test_bad_text_fails_naming_the_file_or_param(tmp_path, content, overrides, named):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    cfg = text_cfg(tmp_path, **{"data.text.path": str(path)} | overrides)
    with pytest.raises(DataFileError, match=named):
        text_data.prepare_text(cfg.data, tmp_path)


def test_a_sequence_longer_than_a_split_fails_naming_the_param():
    with pytest.raises(DataFileError, match="data.text.sequence_length 20 .* test split"):
        windows.check_length({"test": np.arange(15, dtype=np.int32)}, 20)


def test_every_example_appears_once_per_epoch_in_a_seeded_order():
    import tensorflow as tf

    tokens = np.arange(2, 203, dtype=np.int32)  # ids 2..202: each target names its example
    epoch = tf.Variable(0, dtype=tf.int64)
    dataset = windows.windows_dataset(tokens, 5, 16, train=True, seed=3, epoch=epoch)

    def one_pass() -> tuple[np.ndarray, np.ndarray]:
        pairs = [(x.numpy(), y.numpy()) for x, y in dataset]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])

    contexts, targets = one_pass()
    assert sorted(targets.tolist()) == list(range(7, 203))  # T - L examples, each once
    np.testing.assert_array_equal(contexts[:, -1] + 1, targets)  # context precedes target
    again, _ = one_pass()
    np.testing.assert_array_equal(contexts, again)  # same (seed, epoch): same order
    epoch.assign(1)
    _, next_epoch = one_pass()
    assert next_epoch.tolist() != targets.tolist()


def test_the_unigram_baseline_is_the_training_frequency():
    unigram = metrics.unigram_probabilities(np.array([2, 2, 2, 3]), vocab_size=5)
    assert unigram[0] == 0.0 and np.isclose(unigram.sum(), 1.0)
    assert unigram[2] == 4 / 8  # 3 counts + 1, over 4 tokens + 4 smoothing counts
    scores = metrics.language_metrics(
        np.log(np.tile(unigram + 1e-12, (2, 1))), np.array([2, 3]), unigram
    )
    assert np.isclose(scores["perplexity"], scores["unigram_perplexity"], rtol=1e-6)


# ------------------------------------------------------------------ the whole pipeline


@pytest.fixture(scope="module")
def text_repro(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("text-repo"))
    set_params(root, TINY | TEXT)
    return root, dvc_repro(root)


@pytest.mark.slow
@pytest.mark.skipif(not LICENSES.is_dir(), reason="needs the OS's /usr/share/common-licenses")
def test_the_language_model_pipeline_beats_the_unigram_baseline_and_serves_prompts(text_repro):
    import mlflow
    import pandas as pd

    root, output = text_repro
    assert stages_run(output) == ["data", "preprocess", "train", "evaluate", "register", "export"]
    check_result(output)
    check_quiet(output)
    ws = Workspace(root)
    test = json.loads(ws.metrics.read_text())["test"]
    assert test["perplexity"] < test["unigram_perplexity"], test
    assert set(test) <= {
        "accuracy", "top5_accuracy", "loss", "perplexity", "unigram_perplexity",
        "perplexity_vs_unigram",
    }  # fmt: skip
    samples = ws.samples.read_text()
    assert samples.count("[temperature") == 4  # 2 prompts x 2 temperatures

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client, runs = read_mlflow(uri, experiment_of(root))
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")]
    assert steps == [0, 1, 2]
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/licenses-lstm_lm@champion")
        answer = model.predict(pd.DataFrame({"prompt": ["the program", "you may"]}))
        assert len(answer) == 2 and set(answer.columns) == {"prompt", "next_token", "probabilities"}
        assert 0.0 < sum(answer["probabilities"][0].values()) <= 1.0
        settings = {"max_tokens": 5, "temperature": 1.0, "seed": 7}
        prompt = pd.DataFrame({"prompt": ["the program"]})
        first = model.predict(prompt, params=settings)["text"][0]
        again = model.predict(prompt, params=settings)["text"][0]
        assert first == again and len(first.split()) == 5
        with pytest.raises(mlflow.exceptions.MlflowException, match="prompt"):
            model.predict([1, 2])
        # `make serve-model` and batch jobs accept it as this project's model code.
        from tasks.serving.registered import check_model_code

        local = mlflow.artifacts.download_artifacts(
            "models:/licenses-lstm_lm/1", dst_path=str(root)
        )
        check_model_code(Path(local), "models:/licenses-lstm_lm/1")
    finally:
        mlflow.set_tracking_uri(None)
    binding = client.get_registered_model("licenses-lstm_lm").tags
    assert binding["dataset"] == "licenses" and binding["input_dtype"] == "string"


@pytest.mark.slow
@pytest.mark.skipif(not LICENSES.is_dir(), reason="needs the OS's /usr/share/common-licenses")
def test_editing_the_sequence_length_reruns_exactly_the_stages_that_read_it(text_repro):
    """`dvc repro --dry` lists the stages whose params or inputs changed: those that read
    data.text.sequence_length (evaluate and register follow in a real repro because the
    model they read changes; the data stage, which does not read it, stays cached)."""
    root, _ = text_repro
    set_params(root, {"data.text.sequence_length": 12})
    done = subprocess.run(
        ["dvc", "repro", "--dry"],
        cwd=root, env=pipeline_env(), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert stages_run(done.stdout) == ["preprocess", "train", "export"]
