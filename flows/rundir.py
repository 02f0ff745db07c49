"""Where a flow run writes, and which paths every run shares.

`dvc repro` writes to the project directory (DVC owns those outputs). Every flow run,
from a deployment or from `python -m flows.pipeline`, gets its own directory inside it by
default, ``runs/<flow-run-id>/``, so two runs at once never overwrite each other's outputs
and none touches DVC's. What such runs must share (the dataset
download cache and the MLflow store) is named by relative paths in params.yaml; for a
run directory inside the project those keep pointing at the project's own, the one
params.yaml sits in. A directory outside the project (``--workdir /tmp/x``) stays a
self-contained workspace: relative paths resolve inside it, as they always have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig

RUN_ID_FIELD = "{flow_run_id}"  # placeholder in a workdir template, e.g. runs/{flow_run_id}
SQLITE = "sqlite:///"
# params.yaml keys naming caches and stores that all runs share (absent keys are skipped).
SHARED_PATH_KEYS = ("data.tfds_dir", "data.manual_dir", "data.idx_dir", "mlflow.artifact_root")
SHARED_URI_KEYS = ("mlflow.tracking_uri",)


def run_root(workdir: str, flow_run_id: str | None) -> Path:
    """The absolute output directory: ``workdir`` with ``{flow_run_id}`` filled in."""
    if RUN_ID_FIELD in workdir:
        if not flow_run_id:
            raise ValueError(f"workdir {workdir!r} needs a flow run id and there is none")
        workdir = workdir.replace(RUN_ID_FIELD, flow_run_id)
    return Path(workdir).resolve()


def anchored_path(path: str, project: Path) -> str:
    """``path`` taken from ``project`` when relative."""
    return path if Path(path).is_absolute() else str(project / path)


def anchored_uri(uri: str, project: Path) -> str:
    """A relative ``sqlite:///`` URI taken from ``project``; any other URI unchanged."""
    if uri.startswith(SQLITE) and not Path(uri[len(SQLITE) :]).is_absolute():
        return SQLITE + str(project / uri[len(SQLITE) :])
    return uri


def shared_path_overrides(cfg: PipelineConfig, project: Path, root: Path) -> dict[str, Any]:
    """Overrides that anchor relative shared paths to ``project`` for a run directory in it.

    Empty when ``root`` is the project directory itself (params.yaml's values are logged as
    written) or lies outside it (a self-contained workspace). A relative ``sqlite:///``
    tracking URI counts as a path.
    """
    project, root = project.resolve(), root.resolve()
    if root == project or not root.is_relative_to(project):
        return {}
    flat = cfg.flat(everything=True)
    anchored = {key: anchored_path(flat[key], project) for key in SHARED_PATH_KEYS if key in flat}
    anchored |= {key: anchored_uri(flat[key], project) for key in SHARED_URI_KEYS if key in flat}
    return {key: value for key, value in anchored.items() if value != flat[key]}
