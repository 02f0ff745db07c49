"""Scheduled retraining: the pipeline again, on the data version dvc.lock pins.

    prefect deployment run 'scheduled-retrain/nightly' --watch   # or its cron schedule

The data stage does not run: the prepared dataset of the current data version (the
`data/prepared` hash in the project's dvc.lock) is checked out with DVC, from the local
cache or else the DVC remote, and copied into the run's own directory. Then preprocess,
train, evaluate, register and export run as any pipeline run does (the training_pipeline flow,
as a subflow), so what a retrain picks up is the code, params and data version committed
since the last one. The new version becomes champion only under the usual rule.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows.common import (
    DATA_OUT,
    RETRY_BACKOFF_S,
    STAGE_RETRIES,
    failed_without_traceback,
    locked_data_version,
    retry_if_transient,
)
from flows.pipeline import resolve_run_config, training_pipeline
from flows.rundir import run_root
from flows.stage import STAGE_NAMES
from tasks.errors import DataUnavailableError
from tasks.tracking.lineage import dvc_hash
from tasks.workspace import Workspace

DVC_TAIL_CHARS = 2000  # of dvc's output, quoted in an error


@task(
    retries=STAGE_RETRIES,  # `dvc pull` may reach a remote over the network
    retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF_S),
    retry_condition_fn=retry_if_transient,
)
def check_out_data(project: Path, version: str) -> Path:
    """Make the project's data/prepared the locked version: DVC cache first, then remote."""
    prepared = project / DATA_OUT
    if prepared.is_dir() and dvc_hash(prepared) == version:
        return prepared
    pulled = subprocess.run(
        [sys.executable, "-m", "dvc", "pull", DATA_OUT],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if pulled.returncode != 0 or dvc_hash(prepared) != version:
        output = (pulled.stdout + pulled.stderr)[-DVC_TAIL_CHARS:]
        raise DataUnavailableError(
            f"cannot check out data version {version} of {DATA_OUT} "
            f"(`dvc pull {DATA_OUT}` exited {pulled.returncode}):\n{output}"
        )
    return prepared


def copy_prepared(source: Path, ws: Workspace) -> None:
    """Copy the dataset into the run's directory: later checkouts cannot change it mid-run."""
    staging = ws.prepared.with_name(f".{ws.prepared.name}.copying")
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    staging.rename(ws.prepared)


@flow(name="scheduled-retrain", log_prints=True)
def scheduled_retrain(
    overrides: dict[str, Any] | None = None,
    params_path: str = "params.yaml",
    profile: str | None = None,
    workdir: str = "runs/{flow_run_id}",
) -> dict[str, Any]:
    """Retrain on the data version dvc.lock pins; returns the registration record.

    overrides: dotted params.yaml keys to override (data.* keys have no effect: the data
        comes from DVC).
    workdir: the run's own output directory; "{flow_run_id}" is filled in.
    """
    try:
        ws = Workspace(run_root(workdir, flow_run.get_id()))
        resolve_run_config(ws, params_path, profile, overrides)  # fails before any work
        project = Path.cwd()
        version = locked_data_version(project)
        get_run_logger().info("data version %s, outputs in %s", version, ws.root)
        copy_prepared(check_out_data(project, version), ws)
        return training_pipeline(
            overrides=overrides,
            params_path=params_path,
            workdir=str(ws.root),
            profile=profile,
            stages=[name for name in STAGE_NAMES if name != "data"],
        )
    except Exception as error:
        return failed_without_traceback(error)
