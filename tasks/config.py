"""The pipeline's one typed configuration, loaded from params.yaml.

Every entry point (each `dvc repro` stage, the Prefect flow, the tests) goes through
`load_config`, so a typo in params.yaml or in a Prefect override fails the same way,
before any work, with the dotted name of the offending key.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.errors import UserFixableError
from tasks.models.catalog import family, foreign_keys


class ConfigError(UserFixableError, ValueError):
    """A params.yaml value or an override is wrong; the message names the key."""


class _Section(BaseModel):
    # strict: "3" is not an int and 1 is not a bool; extra=forbid: typos are errors.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available now (Linux); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class SyntheticConfig(_Section):
    train_size: int = Field(gt=0)
    test_size: int = Field(gt=0)
    image_size: int = Field(ge=8)
    channels: Literal[1, 3]
    num_classes: int = Field(ge=2)
    noise: float = Field(ge=0.0)


class TextConfig(_Section):
    path: str = Field(min_length=1)
    test_fraction: float = Field(gt=0.0, lt=1.0)
    level: Literal["word", "character"]
    vocab_size: int = Field(ge=3)
    sequence_length: int = Field(ge=1)


class DataConfig(_Section):
    source: Literal["tfds", "idx", "synthetic", "text"]
    name: str = Field(min_length=1)
    tfds_dir: str
    manual_dir: str
    idx_dir: str
    val_fraction: float = Field(gt=0.0, lt=1.0)
    seed: int
    # Fine-tuning on a few labels: keep these classes (relabelled 0..k-1 in this order;
    # empty = all) and at most this many training labels per class (0 = all).
    classes: list[int]
    labels_per_class: int = Field(ge=0)
    synthetic: SyntheticConfig
    text: TextConfig

    @model_validator(mode="after")
    def _synthetic_set_can_exist(self) -> DataConfig:
        """The synthetic set's sizes are known here: a split left empty, or arrays bigger
        than this machine's free memory, fail now rather than minutes later."""
        if self.source != "synthetic":
            return self
        synthetic = self.synthetic
        per_class = synthetic.train_size // synthetic.num_classes
        held_out = round(self.val_fraction * per_class)
        if held_out < 1 or held_out >= per_class:
            which = "no validation example" if held_out < 1 else "no training example"
            raise ValueError(
                f"data.val_fraction={self.val_fraction} leaves {which}: each of the "
                f"{synthetic.num_classes} classes has {per_class} of the "
                f"data.synthetic.train_size={synthetic.train_size} examples; choose a "
                "fraction that holds out at least one per class and keeps the rest"
            )
        # uint8 arrays, and the copies the train/validation split makes of them
        needed = 2 * (synthetic.train_size + synthetic.test_size)
        needed *= synthetic.image_size**2 * synthetic.channels
        available = available_memory()
        if available is not None and needed > available:
            raise ValueError(
                f"data.synthetic.train_size={synthetic.train_size} and test_size="
                f"{synthetic.test_size} at {synthetic.image_size}x{synthetic.image_size}x"
                f"{synthetic.channels} need about {needed / 2**30:.1f} GiB of memory, and "
                f"this machine has {available / 2**30:.1f} GiB available: lower them"
            )
        return self

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, classes: list[int]) -> list[int]:
        if len(set(classes)) != len(classes) or any(c < 0 for c in classes):
            raise ValueError(f"class indices must be distinct and >= 0, got {classes}")
        if len(classes) == 1:
            raise ValueError("keep at least two classes (or [] for all)")
        return classes

    @field_validator("name")
    @classmethod
    def _known_tfds_name(cls, name: str, info: ValidationInfo) -> str:
        # A misspelt name would otherwise surface only inside the data stage, after an
        # MLflow run was opened; TFDS's registry is local, so checking here is offline-safe.
        if info.data.get("source") == "tfds" and (problem := _unknown_tfds_name(name)):
            raise ValueError(problem)
        return name


def _unknown_tfds_name(name: str) -> str | None:
    """Why ``name`` is not a dataset TFDS knows, with the closest known names; None if it is.

    Accepts what ``tfds.builder`` accepts (``cifar10``, ``cifar10:3.0.2``, ``mnist/config``).
    Namespaced community names (``huggingface:mnist``) are left to the data stage: looking
    them up reaches the network. TFDS is imported here, not at module level: it costs about
    0.5 s and only a tfds source needs it.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming

    try:
        dataset, _ = naming.parse_builder_name_kwargs(name)
    except ValueError:
        return f"{name!r} is not a TFDS dataset name (name, name:version or name/config)"
    if dataset.namespace is not None:
        return None
    try:
        tfds.builder_cls(dataset.name)
    except tfds.core.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(dataset.name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "tfds.list_builders() lists them"
        return f"{dataset.name!r} is not a TFDS dataset; {hint}"
    return None


class PreprocessConfig(_Section):
    device: Literal["auto", "cpu", "gpu"]
    pad: int = Field(ge=0)
    flip_prob: float = Field(ge=0.0, le=1.0)
    erase_prob: float = Field(ge=0.0, le=1.0)
    erase_size: int = Field(ge=1)
    grid_samples: int = Field(ge=1, le=256)
    num_threads: int = Field(ge=1)


class SeedCnnConfig(_Section):
    name: Literal["seed_cnn"]


class FastCnnConfig(_Section):
    name: Literal["fast_cnn"]
    widths: list[int] = Field(min_length=1)  # conv-group widths
    activation: Literal["gelu", "relu"]

    @field_validator("widths")
    @classmethod
    def _positive(cls, widths: list[int]) -> list[int]:
        if min(widths) < 1:
            raise ValueError("every width must be >= 1")
        return widths


class TransferConfig(_Section):
    name: Literal["transfer"]
    base: Literal["vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0"]
    head: Literal["seed", "pool"]
    # imagenet | none | <file>.weights.h5 | models:/<name>@<alias>
    weights: str = Field(min_length=1)
    input_size: int = Field(ge=32)
    unfreeze: int = Field(ge=0)
    dropout: float = Field(ge=0.0, lt=1.0)  # the pool head's


class LstmLmConfig(_Section):
    name: Literal["lstm_lm"]
    embedding_dim: int = Field(ge=1)
    units: int = Field(ge=1)
    layers: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)


# One pydantic section per family (tasks/models/catalog.py), chosen by model.name: a run's
# config, and so its MLflow params, holds only its own family's fields. params.yaml keeps
# every family's settings under model:, the others' are set aside when it is read.
FAMILY_CONFIGS: dict[str, type[_Section]] = {
    "seed_cnn": SeedCnnConfig,
    "fast_cnn": FastCnnConfig,
    "transfer": TransferConfig,
    "lstm_lm": LstmLmConfig,
}
ModelConfig = Annotated[
    SeedCnnConfig | FastCnnConfig | TransferConfig | LstmLmConfig, Field(discriminator="name")
]
# Keys only some data sources read (a prefix covers a section): logged only for those.
IMAGE_SOURCES = ("tfds", "idx", "synthetic")
SOURCE_KEYS = {
    "data.name": ("tfds", "idx"),
    "data.tfds_dir": ("tfds",),
    "data.manual_dir": ("tfds",),
    "data.idx_dir": ("idx",),
    "data.synthetic.": ("synthetic",),
    "data.text.": ("text",),
    "data.classes": IMAGE_SOURCES,
    "data.labels_per_class": IMAGE_SOURCES,
}


def _family_section(model: Any) -> Any:
    """params.yaml's model: section cut to the fields of model.name's family."""
    if not isinstance(model, Mapping) or model.get("name") not in FAMILY_CONFIGS:
        return model  # the union's validation says what is missing or unknown
    fields = FAMILY_CONFIGS[model["name"]].model_fields
    return {key: value for key, value in model.items() if key in fields}


class TrainConfig(_Section):
    optimizer: Literal["adam", "sgd"]
    learning_rate: float = Field(gt=0.0)
    momentum: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    schedule: Literal["constant", "warmup_linear"]
    warmup_fraction: float = Field(ge=0.0, lt=1.0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)
    weight_averaging: bool
    ema_momentum: float = Field(gt=0.0, lt=1.0)
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
    xla: bool | Literal["auto"]
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    seed: int
    # transfer only: train.epochs is not used; these two phases are (either may be 0)
    frozen_epochs: int = Field(ge=0)
    finetune_epochs: int = Field(ge=0)
    finetune_learning_rate: float = Field(gt=0.0)
    # tf.distribute (tasks/training/distribute.py); train.batch_size stays per replica
    distribute: Literal["auto", "none", "mirrored", "multi_worker"]
    replicas: int = Field(ge=1)  # mirrored without GPUs: logical CPU devices
    workers: int = Field(ge=1)  # multi_worker without TF_CONFIG: local worker processes
    lr_scaling: Literal["none", "linear"]


class EvaluateConfig(_Section):
    batch_size: int = Field(ge=1)
    tta_flip: bool
    # lstm_lm only: text generated from each prompt at each temperature, seeded
    prompts: list[str] = Field(min_length=1)
    temperatures: list[float] = Field(min_length=1)
    generate_tokens: int = Field(ge=1)
    seed: int


AUTO_MODEL_NAME = "auto"  # register.model_name and mlflow.experiment: named by the data


def modality(source: str) -> str:
    """What a data source gives: "text" (token streams) or "image" (uint8 NHWC arrays)."""
    return "text" if source == "text" else "image"


def dataset_identity(source: str, name: str, classes: list[int] | tuple[int, ...] = ()) -> str:
    """What a registered model is bound to: the dataset's name (TFDS and IDX files of the
    same name are the same official data), or "synthetic" for the generated set; a class
    subset (data.classes) is another task: ``fashion_mnist-classes-5-6-7-8-9``."""
    dataset = "synthetic" if source == "synthetic" else name
    return dataset + "".join(f"-{c}" if i else f"-classes-{c}" for i, c in enumerate(classes))


class RegisterConfig(_Section):
    # Letters, digits, '.', '_', '-': the name goes into MLflow search filters and URLs.
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    promote_margin: float = Field(ge=0.0)


EXPORT_FORMATS = ("saved_model", "litert", "onnx")


class ExportConfig(_Section):
    formats: list[Literal["saved_model", "litert", "onnx"]] = Field(min_length=1)
    parity_samples: int = Field(ge=1)
    # LiteRT variants beside float32; each level includes the one before it.
    quantize: Literal["none", "dynamic", "int8"]

    @field_validator("formats")
    @classmethod
    def _unique(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError(f"each format at most once, got {formats}")
        return formats


class MlflowConfig(_Section):
    experiment: str = Field(min_length=1)
    tracking_uri: str = Field(min_length=1)
    artifact_root: str = Field(min_length=1)


# pydantic warns that the field `register` shadows ABCMeta.register; the section name
# matches params.yaml and dvc.yaml, and nothing here uses ABC registration.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class PipelineConfig(_Section):
        data: DataConfig
        preprocess: PreprocessConfig
        model: ModelConfig
        train: TrainConfig
        evaluate: EvaluateConfig
        register: RegisterConfig
        export: ExportConfig
        mlflow: MlflowConfig

        @model_validator(mode="before")
        @classmethod
        def _own_family_only(cls, tree: Any) -> Any:
            if isinstance(tree, Mapping) and "model" in tree:
                return {**tree, "model": _family_section(tree["model"])}
            return tree

        @model_validator(mode="before")
        @classmethod
        def _name_the_registered_model(cls, tree: Any) -> Any:
            """``register.model_name: auto`` -> ``<dataset>-<model>`` (synthetic-seed_cnn,
            fashion_mnist-fast_cnn): runs on different data never share a registered
            model by default, and the resolved config logs the real name."""
            try:
                register, data, model = tree["register"], tree["data"], tree["model"]
                if register.get("model_name") != AUTO_MODEL_NAME:
                    return tree
                dataset = dataset_identity(data["source"], data["name"], data.get("classes", ()))
                # A TFDS version or namespace (cifar10:3.0.2) is not allowed in a model name.
                name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{dataset}-{model['name']}")
            except (TypeError, KeyError, AttributeError):
                return tree  # field validation reports what is missing or malformed
            return {**tree, "register": {**register, "model_name": name}}

        @model_validator(mode="before")
        @classmethod
        def _name_the_experiment(cls, tree: Any) -> Any:
            """``mlflow.experiment: auto`` -> the dataset's identity (cifar10, synthetic,
            fashion_mnist): an experiment holds the runs that can be compared, every model
            trained on one dataset, and its name says which. A name given is kept."""
            try:
                tracking, data = tree["mlflow"], tree["data"]
                if tracking.get("experiment") != AUTO_MODEL_NAME:
                    return tree
                name = dataset_identity(data["source"], data["name"], data.get("classes", ()))
            except (TypeError, KeyError, AttributeError):
                return tree
            return {**tree, "mlflow": {**tracking, "experiment": name}}

        @model_validator(mode="after")
        def _model_fits_data(self) -> PipelineConfig:
            """A language model needs text and an image model images: checked here, before
            the data stage spends minutes preparing data the model cannot read."""
            wanted, given = family(self.model.name).modality, modality(self.data.source)
            if wanted != given:
                fix = "text" if wanted == "text" else "tfds, idx or synthetic"
                raise ValueError(
                    f"model.name {self.model.name!r} reads {wanted} but data.source "
                    f"{self.data.source!r} gives {given}: set data.source to {fix}"
                )
            if family(self.model.name).two_phases and not (
                self.train.frozen_epochs + self.train.finetune_epochs
            ):
                raise ValueError(
                    "model.name 'transfer' trains train.frozen_epochs then "
                    "train.finetune_epochs: set at least one of them above 0"
                )
            return self

        def flat(self, everything: bool = False) -> dict[str, Any]:
            """Dotted-key view (``train.epochs``), the form MLflow params and overrides use:
            the keys this run reads (its data source's and its model family's), or with
            ``everything`` every key, for checks that must see all of them."""
            flat = _flatten(self.model_dump())
            if everything:
                return flat
            foreign = foreign_keys(self.model.name)
            return {
                key: value
                for key, value in flat.items()
                if key not in foreign
                and all(
                    self.data.source in sources
                    for prefix, sources in SOURCE_KEYS.items()
                    if key == prefix or (prefix.endswith(".") and key.startswith(prefix))
                )
            }


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Split a command-line ``key=value``; the value is read as YAML so ``3`` is an int."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"override {text!r} must look like section.key=value, e.g. train.epochs=3"
        )
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({_yaml_problem(error)}); "
            "quote it if it is meant as text"
        ) from None


def apply_overrides(tree: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``tree`` with dotted-key overrides set; unknown keys are errors."""
    merged = yaml.safe_load(yaml.safe_dump(tree))  # deep copy of plain data
    for dotted, value in overrides.items():
        node = merged
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "none"
                where = ".".join(parts[:depth]) or "top level"
                raise ConfigError(
                    f"unknown config key {dotted!r}: {part!r} is not a key of {where} "
                    f"(known: {known})"
                )
            if depth == len(parts) - 1:
                if isinstance(node[part], dict):
                    raise ConfigError(f"override {dotted!r} names a section; set one of its keys")
                node[part] = value
            else:
                node = node[part]
    return merged


def _describe(error: ValidationError) -> str:
    """One line, so the entry points print the key on their single error line."""
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown config key {key!r}: remove it or fix its spelling")
        elif item["type"] == "missing":
            problems.append(f"missing config key {key!r}: add it to params.yaml")
        elif item["type"] == "value_error":  # our validators' messages already quote the value
            problems.append(f"config key {key!r}: {item['ctx']['error']}")
        else:
            problems.append(f"config key {key!r}: {item['msg']} (got {item.get('input')!r})")
    return "invalid pipeline config: " + "; ".join(problems)


def build_config(
    tree: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> PipelineConfig:
    merged = apply_overrides(dict(tree), overrides or {})
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_profile(path: str | Path) -> dict[str, Any]:
    """A profile file: a flat mapping of dotted params.yaml keys to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"profile {path} not found (see profiles/ for the shipped ones)")
    overrides = _read_yaml(path) or {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise ConfigError(f"profile {path} must map dotted keys (train.epochs) to values")
    return overrides


def load_config(
    path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None
) -> PipelineConfig:
    """Read params.yaml, apply dotted overrides, validate; raise ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found; run from the repository root or pass its path"
        )
    tree = _read_yaml(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data, train, ...)")
    return build_config(tree, overrides)


def _read_yaml(path: Path) -> Any:
    """``path`` parsed as YAML; a syntax error becomes a ConfigError naming file and line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ConfigError(
            f"{where}: not valid YAML ({_yaml_problem(error)}); fix the syntax there"
        ) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's one-phrase reason ("mapping values are not allowed here"), without its
    multi-line excerpt of the file."""
    return getattr(error, "problem", None) or str(error).splitlines()[0]
