"""A registered version a caller names, checked before it is loaded.

Loading an MLflow pyfunc runs the model code stored with it, so whoever serves or predicts
with a caller's model URI (flows/predict.py, flows/serve_model.py) goes through here: the
URI must name a version or alias in the plain form, the version must exist, and its code
must be a version of this repository's tasks/serving/classifier_model.py or text_model.py
(as it is now or in any commit), loaded by MLflow's models-from-code loader with no extra
code paths.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import ModelRequestError

# Same name rule as params.yaml register.model_name; MLflow's alias rule (word characters
# and '-'); versions are positive integers.
MODEL_URI = re.compile(
    r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})"
    r"(?:/(?P<version>[1-9]\d{0,8})|@(?P<alias>[A-Za-z0-9_][A-Za-z0-9_-]{0,254}))"
)
MAX_QUOTED_CHARS = 200  # of a caller's text quoted back in an error
REPO = Path(__file__).resolve().parents[2]
MODEL_CODE = "tasks/serving/classifier_model.py"  # what tasks/images/register.py logs as model code
TEXT_MODEL_CODE = "tasks/serving/text_model.py"  # ... for a language model
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader for models-from-code


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None
    alias: str | None

    def __str__(self) -> str:
        return f"models:/{self.name}" + (f"/{self.version}" if self.version else f"@{self.alias}")


def parse_model_uri(uri: Any) -> ModelRef:
    """The one gate for a caller's model URI: only names and versions or aliases made of
    letters, digits, '.', '_' and '-' get past it."""
    match = MODEL_URI.fullmatch(uri) if isinstance(uri, str) else None
    if match is None:
        raise ModelRequestError(
            f"{repr(uri)[:MAX_QUOTED_CHARS]} is not a model URI: expected "
            "models:/<name>/<version> or models:/<name>@<alias>, e.g. "
            "models:/cifar10-seed_cnn/3 or models:/cifar10-seed_cnn@champion"
        )
    return ModelRef(match["name"], match["version"], match["alias"])


def resolve_version(client: Any, ref: ModelRef, uri: str) -> str:
    """The version number ``ref`` names (an alias resolved), or ModelRequestError saying what the
    registry has instead."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(ref.name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ModelRequestError(f"{ref}: no registered model {ref.name!r} in {uri}") from None
    if ref.alias:
        if ref.alias not in model.aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(model.aliases.items()))
            raise ModelRequestError(
                f"{ref}: {ref.name!r} has no alias {ref.alias!r} (its aliases: {known or 'none'})"
            )
        return str(model.aliases[ref.alias])
    try:
        return str(client.get_model_version(ref.name, ref.version).version)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{ref.name}'"))
    have = f"versions {versions[0]} to {versions[-1]}" if versions else "no versions"
    raise ModelRequestError(f"{ref} does not exist: {ref.name!r} has {have} in {uri}")


def download_version(uri: str, store: str, dst: Path) -> Path:
    """Download the version ``uri`` (``models:/<name>/<version>``) names from the registry
    in ``store`` into ``dst``.

    ``download_artifacts(models:/..., tracking_uri=...)`` resolves the name through
    MLflow's registry URI, which falls back to ``sqlite:///mlflow.db`` in the working
    directory (and creates it) unless one is set, and setting it would change it for the
    whole process: so the version's own location is asked of a client bound to ``store``.
    """
    import mlflow

    ref = parse_model_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    source = client.get_model_version_download_uri(ref.name, ref.version)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst), tracking_uri=store
        )
    )


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def known_model_code(model_code: str = MODEL_CODE) -> set[str]:
    """Git blob ids of ``model_code``: the working tree's and every committed one."""
    known = {git_blob_id((REPO / model_code).read_bytes())}
    try:
        listed = subprocess.run(
            ["git", "rev-list", "--objects", "--all", "--", model_code],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return known  # not a git checkout: the working tree's code only
    return known | {
        line.split()[0] for line in listed.splitlines() if line.endswith(f" {model_code}")
    }


def check_model_code(model_dir: Path, uri: str) -> None:
    """Refuse a downloaded version that would run code other than this project's when
    loaded: another loader module, extra code paths, or model code that is not a version
    of tasks/serving/classifier_model.py or text_model.py."""
    import yaml

    try:
        ours = is_project_model(yaml.safe_load((model_dir / "MLmodel").read_text()), model_dir)
    except (KeyError, TypeError, AttributeError, yaml.YAMLError):
        ours = False  # not the MLmodel file the register stage writes
    if not ours:
        raise ModelRequestError(
            f"{uri} was not registered by this project's register stage: its model code is "
            f"not a version of {MODEL_CODE} or {TEXT_MODEL_CODE}, and loading it would run "
            "that code; refused"
        )


def is_project_model(mlmodel: dict[str, Any], model_dir: Path) -> bool:
    pyfunc = mlmodel["flavors"]["python_function"]
    code = model_dir / Path(str(pyfunc["model_code_path"])).name
    artifacts = [model_dir / str(a["path"]) for a in pyfunc["artifacts"].values()]
    ours = {Path(path).name: path for path in (MODEL_CODE, TEXT_MODEL_CODE)}
    return (
        pyfunc["loader_module"] == CODE_LOADER
        and not pyfunc.get("code")
        and code.name in ours
        and code.is_file()
        and git_blob_id(code.read_bytes()) in known_model_code(ours[code.name])
        and all(path.resolve().is_relative_to(model_dir.resolve()) for path in artifacts)
    )


def input_shape(pyfunc: Any, uri: str) -> tuple[int, int, int]:
    """(H, W, C) of one image, from the version's input schema."""
    schema = pyfunc.metadata.get_input_schema()
    shape = tuple(schema.inputs[0].shape) if schema and schema.is_tensor_spec() else ()
    if len(shape) != 4 or shape[3] not in (1, 3) or min(shape[1:3]) < 1:
        raise ModelRequestError(f"{uri} takes input of shape {shape}, not images (N, H, W, 1 or 3)")
    return int(shape[1]), int(shape[2]), int(shape[3])
