"""params.yaml is validated once, loudly, before any work."""

from __future__ import annotations

import pytest
import yaml

from tasks.config import ConfigError, apply_overrides, load_config, load_profile, parse_override
from tests.helpers.project import PARAMS


def test_real_params_yaml_loads_with_expected_defaults():
    cfg = load_config(PARAMS)
    assert cfg.data.name == "cifar10"
    assert cfg.data.source == "tfds"
    assert cfg.model.name == "seed_cnn"
    assert cfg.flat()["train.epochs"] == cfg.train.epochs


def test_overrides_replace_values_and_keep_the_rest():
    cfg = load_config(PARAMS, {"train.epochs": 3, "data.synthetic.noise": 0.5})
    base = load_config(PARAMS)
    assert cfg.train.epochs == 3
    assert cfg.data.synthetic.noise == 0.5
    assert cfg.train.learning_rate == base.train.learning_rate


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"train.epoch": 3}, "train.epoch"),
        ({"trian.epochs": 3}, "trian.epochs"),
        ({"train.epochs": "3"}, "train.epochs"),  # strings are not ints
        ({"train.learning_rate": "fast"}, "train.learning_rate"),
        ({"train.epochs": 0}, "train.epochs"),  # bad value
        ({"data.source": "ftp"}, "data.source"),
        ({"model.name": "resnet9000"}, "resnet9000"),
        ({"data.val_fraction": 1.5}, "data.val_fraction"),
        ({"train": 3}, "train"),
    ],
)
def test_bad_overrides_fail_naming_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(PARAMS, overrides)


def test_unknown_key_in_the_file_is_named(tmp_path):
    tree = yaml.safe_load(PARAMS.read_text())
    tree["train"]["warmup"] = 5
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.warmup'"):
        load_config(bad)


def test_missing_key_in_the_file_is_named(tmp_path):
    tree = yaml.safe_load(PARAMS.read_text())
    del tree["register"]["model_name"]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"missing config key 'register\.model_name'"):
        load_config(bad)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_parse_override_reads_values_as_yaml():
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("train.learning_rate=0.01") == ("train.learning_rate", 0.01)
    assert parse_override("data.source=synthetic") == ("data.source", "synthetic")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.epochs")


def test_apply_overrides_does_not_mutate_its_input():
    tree = {"train": {"epochs": 1}}
    apply_overrides(tree, {"train.epochs": 2})
    assert tree == {"train": {"epochs": 1}}


@pytest.mark.parametrize("profile", sorted((PARAMS.parent / "profiles").glob("*.yaml")))
def test_shipped_profiles_are_valid_overrides(profile):
    cfg = load_config(PARAMS, load_profile(profile))
    assert cfg.model.name == "fast_cnn"


def test_profile_with_a_typo_fails_naming_the_key(tmp_path):
    bad = tmp_path / "profile.yaml"
    bad.write_text("train.epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_config(PARAMS, load_profile(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "missing.yaml")


def test_a_validation_fraction_that_holds_out_nothing_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.0001 leaves no validation example"):
        load_config(PARAMS, {"data.source": "synthetic", "data.val_fraction": 0.0001})
    with pytest.raises(ConfigError, match=r"leaves no training example"):
        load_config(PARAMS, {"data.source": "synthetic", "data.val_fraction": 0.9999})


def test_a_synthetic_set_bigger_than_memory_is_refused_before_allocating():
    from tasks.config import available_memory

    huge = {"data.source": "synthetic", "data.synthetic.train_size": 100_000_000}
    if available_memory() is None or available_memory() > 572 * 2**30:
        pytest.skip("memory unknown here (no /proc/meminfo), or more than the set needs")
    with pytest.raises(ConfigError, match=r"need about 572\.2 GiB of memory.*lower them"):
        load_config(PARAMS, huge)


def test_an_image_too_small_for_the_model_names_the_key_and_the_smallest_size():
    from tasks.models.build import check_input_fits

    cfg = load_config(PARAMS, {"data.source": "synthetic", "data.synthetic.image_size": 8})
    with pytest.raises(ConfigError) as refused:
        check_input_fits(cfg.model, (8, 8, 3), 10, "data.synthetic.image_size=8")
    message = str(refused.value)
    assert message.startswith("data.synthetic.image_size=8 is too small for model.name 'seed_cnn'")
    assert "needs at least 18x18" in message and "\x1b" not in message
    check_input_fits(cfg.model, (18, 18, 3), 10, "unused")  # the size it names does fit


@pytest.mark.parametrize(
    ("overrides", "own", "foreign"),
    [
        ({}, {"model.name"}, {"model.base", "model.units", "train.frozen_epochs", "evaluate.seed"}),
        (
            {"model.name": "transfer"},
            {"model.base", "model.unfreeze", "train.frozen_epochs"},
            {"model.widths", "model.units", "train.epochs", "evaluate.prompts"},
        ),
        (
            {"model.name": "lstm_lm", "data.source": "text"},
            {"model.units", "evaluate.prompts", "data.text.vocab_size"},
            {"model.base", "evaluate.tta_flip", "data.classes", "data.synthetic.noise"},
        ),
    ],
)
def test_a_run_config_holds_its_own_family_and_source_only(overrides, own, foreign):
    """What a run logs as MLflow params (PipelineConfig.flat): its model family's fields
    (a pydantic section per family) and its data source's, never another's."""
    flat = load_config(PARAMS, overrides).flat()
    assert own <= set(flat), sorted(flat)
    assert not foreign & set(flat), sorted(foreign & set(flat))


def test_another_familys_setting_is_not_part_of_a_model_config():
    cfg = load_config(PARAMS, {"model.name": "seed_cnn", "model.base": "resnet50"})
    assert cfg.model.model_dump() == {"name": "seed_cnn"}
