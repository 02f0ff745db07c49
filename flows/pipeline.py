"""The training pipeline as a Prefect flow: data -> preprocess -> train -> evaluate -> register
-> export.

Each Prefect task calls the same stage function `dvc repro` runs (flows.stage), so the
two ways of running the pipeline cannot drift apart. Flow parameters are dotted-key
overrides of params.yaml, validated by the same schema before any work starts:

    python -m flows.pipeline train.epochs=3 data.source=synthetic
    prefect deployment run 'training-pipeline/train' -p overrides='{"train.epochs": 3}'

A stage whose failure is transient (tracking server or network unreachable) is retried
with backoff; a failure names the stage and its cause. Each stage's log and a run summary
become Prefect artifacts. Deployments write to runs/<flow-run-id>/ (flows/rundir.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.exceptions import FailedRun
from prefect.runtime import deployment, flow_run
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from flows import reporting
from flows.common import (
    RETRY_BACKOFF_S,
    STAGE_RETRIES,
    ephemeral_server_starting,
    failed_without_traceback,
    patient_ephemeral_server,
    retry_if_transient,
)
from flows.reporting import outcome_line
from flows.rundir import RUN_ID_FIELD, run_root, shared_path_overrides
from flows.stack import security
from flows.stage import (
    CLOSING_STAGE,
    STAGE_NAMES,
    StageFailed,
    expected_errors,
    stage_functions,
)
from tasks import startup
from tasks.config import ConfigError, PipelineConfig, load_config, load_profile, parse_override
from tasks.models.build import check_input_fits
from tasks.models.catalog import image_size_key
from tasks.tracking import registry, runs, store
from tasks.training import distribute
from tasks.workspace import Workspace, read_json

MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")


@task(
    name="stage",
    task_run_name="{name}",
    cache_policy=None,  # stages write files: they must always run
    retries=STAGE_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF_S),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
)
def run_stage(name: str, cfg: PipelineConfig, ws: Workspace) -> Any:
    """One pipeline stage, its output captured into a Prefect artifact."""
    with reporting.captured_stage_log(name):
        try:
            return stage_functions()[name](cfg, ws)
        except Exception as error:
            raise StageFailed.wrap(name, error) from error


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    overrides: dict[str, Any] | None = None,
    params_path: str = "params.yaml",
    workdir: str = ".",
    profile: str | None = None,
    stages: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Run the stages in ``workdir`` (by default the project directory, as `dvc repro` does).

    overrides: dotted params.yaml keys to override, e.g. {"train.epochs": 3}.
    workdir: output directory; "{flow_run_id}" in it is filled in (runs/{flow_run_id}).
    profile: a file of such overrides (profiles/*.yaml), applied before ``overrides``.
    stages: a subset of the stages (default: all). Without register the MLflow run is
        closed but can be registered later (the sweep registers only its best point).
    parent_run_id: nest this MLflow run under that one (a sweep's parent run).
    Returns the registration record (with the export's parity under "exports") when
    register runs, else the last stage's result.
    """
    ws = Workspace(run_root(workdir, flow_run.get_id()))
    try:
        cfg = resolve_run_config(ws, params_path, profile, overrides)  # fails before any work
        names = select_stages(stages)
        if parent_run_id is not None and not MLFLOW_RUN_ID.fullmatch(parent_run_id):
            raise ConfigError(
                f"parent_run_id {parent_run_id!r} is not an MLflow run id (32 hex digits)"
            )
        if names[0] == "data":
            registry.check_binding(cfg, ws)  # before a run is opened or any data is read
        preflight = "train" in names and not distribute.launches_workers(cfg.train)
        if preflight and cfg.data.source == "synthetic":  # its image size is known already
            distribute.prepare_devices(cfg.train)  # before the check's model starts TensorFlow
            size, synthetic = cfg.data.synthetic.image_size, cfg.data.synthetic
            check_input_fits(
                cfg.model,
                (size, size, synthetic.channels),
                synthetic.num_classes,
                image_size_key(cfg),
            )
        run_id = runs.start_pipeline_run(
            cfg, ws, run_origin(), label=flow_run.get_name(), parent_run_id=parent_run_id
        )
        get_run_logger().info("MLflow run %s, outputs in %s", run_id, ws.root)
        results = run_stages(names, cfg, ws, run_id)
    except Exception as error:
        return failed_without_traceback(error)
    metrics = results.get("evaluate") or (read_json(ws.metrics) if ws.metrics.is_file() else None)
    if "register" not in results:
        reporting.publish_pipeline_summary(ws, run_id, metrics, None)
        return results[names[-1]]
    record = results["register"] | ({"exports": results["export"]} if "export" in results else {})
    reporting.publish_pipeline_summary(ws, run_id, metrics, record)
    get_run_logger().info("%s", outcome_line(record))
    return record


def run_origin() -> str:
    """The MLflow run's Source: the deployment that started this flow run (train, or nightly
    and sweep, whose flows run this one), or the command line."""
    name = deployment.get_name()
    return f"deployment {name}" if name else "python -m flows.pipeline"


def run_stages(
    names: tuple[str, ...], cfg: PipelineConfig, ws: Workspace, run_id: str
) -> dict[str, Any]:
    """Run ``names`` in order inside the pipeline's MLflow run; close the run however it ends."""
    if names[0] != "data":
        runs.log_upstream_outputs(ws, run_id)
    results: dict[str, Any] = {}
    try:
        upstream: list[Any] = []
        for name in names:
            # The Prefect UI draws the chain of stages from wait_for. quote(): Prefect would
            # otherwise take any value in the config equal by identity to a value an earlier
            # stage returned (small ints, interned strings) for an input from that stage.
            state = run_stage(name, quote(cfg), quote(ws), wait_for=upstream, return_state=True)
            results[name] = state.result()  # a failed stage raises its error here
            upstream = [state]
    except BaseException as error:
        with suppress(Exception):  # the stage's own error is the one to report
            if name := startup.stop_signal(error):  # Ctrl-C, SIGTERM
                status, reason = "KILLED", f"stopped by {name}"
            else:
                status, reason = "FAILED", f"{type(error).__name__}: {error}"
            runs.end_pipeline_run(ws, status, keep_handle=False, reason=reason)
        raise
    if CLOSING_STAGE not in names:
        runs.end_pipeline_run(ws, "FINISHED", keep_handle=True)
    return results


def select_stages(stages: list[str] | None) -> tuple[str, ...]:
    """The requested stages in pipeline order; all of them when none are named."""
    if not stages:
        return STAGE_NAMES
    unknown = sorted(set(stages) - set(STAGE_NAMES))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}: the stages are {', '.join(STAGE_NAMES)}")
    return tuple(name for name in STAGE_NAMES if name in stages)


def resolve_config(
    ws: Workspace, params_path: str, profile: str | None, overrides: dict[str, Any] | None
) -> PipelineConfig:
    """params.yaml, then the profile's overrides, then explicit ones; validated.

    Relative params and profile paths are taken from the current directory, the project
    (where a deployment runs). For a run directory inside the project (runs/<id>/),
    relative cache and store paths keep pointing at the project's, so runs share them.
    """
    params = Path(params_path).resolve()
    merged = (load_profile(Path(profile).resolve()) if profile else {}) | (overrides or {})
    cfg = load_config(params, merged)
    shared = shared_path_overrides(cfg, params.parent, ws.root)
    return load_config(params, merged | shared) if shared else cfg


def resolve_run_config(
    ws: Workspace, params_path: str, profile: str | None, overrides: dict[str, Any] | None
) -> PipelineConfig:
    """resolve_config, and for a run created through the API (a deployment) the checks that
    keep it reading and writing inside the project (flows/stack/security.py). The local CLI,
    with no deployment, may use any path."""
    if deployment.get_id() is None:
        return resolve_config(ws, params_path, profile, overrides)
    project = Path.cwd()
    files = {"params_path": params_path, "profile": profile}
    security.check_deployment_files(project, ws.root, files)
    cfg = resolve_config(ws, params_path, profile, overrides)
    security.check_deployment_stores(project, ws.root, cfg, os.environ.get(store.TRACKING_ENV))
    return cfg


class WithoutFailedStateLines(logging.Filter):
    """Drops Prefect's "Finished in state Failed(...)" lines from the terminal (the API and
    UI keep them): the task's and the flow's would repeat the one `error:` line this
    command ends with. Retries, tracebacks of bugs and every other line still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Finished in state Failed(")


def one_error_line_on_the_terminal() -> None:
    for handler in logging.getLogger().handlers:  # Prefect's console handler sits on root
        handler.addFilter(WithoutFailedStateLines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--profile", help="file of overrides, e.g. profiles/fast_fashion_mnist.yaml"
    )
    parser.add_argument(
        "--workdir",
        default=f"runs/{RUN_ID_FIELD}",
        help="where outputs go (default runs/<flow-run-id>/, git- and DVC-ignored, so the "
        "outputs DVC tracks stay as `dvc repro` left them; `--workdir .` writes over them)",
    )
    parser.add_argument(
        "--stages", nargs="+", metavar="STAGE", help=f"a subset, in order: {' '.join(STAGE_NAMES)}"
    )
    args = parser.parse_args(argv)
    # Paths typed on the command line are relative to the shell's directory.
    args.params = str(Path(args.params).resolve())
    args.profile = args.profile and str(Path(args.profile).resolve())
    # Before TensorFlow loads: calm logs on CPU; no telemetry (Prefect's temporary server
    # phones home by default, and logs an error offline).
    if note := startup.prepare_process():
        print(note, file=sys.stderr)
    # SIGTERM unwinds like Ctrl-C (also when SIGINT starts ignored, as in a background job
    # of a script): the MLflow run ends KILLED and Prefect's temporary server is stopped.
    signal.signal(signal.SIGTERM, startup.raise_interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    one_error_line_on_the_terminal()
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
        # Validate here too, so a typo fails before a Prefect API is even started.
        resolve_config(Workspace(Path(args.workdir)), args.params, args.profile, overrides)
        names = select_stages(args.stages)
        with ephemeral_server_starting():
            startup.import_tensorflow()
        with patient_ephemeral_server():
            record = training_pipeline(
                overrides=overrides,
                params_path=args.params,
                workdir=args.workdir,
                profile=args.profile,
                stages=list(names),
            )
    except expected_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FailedRun as error:  # the flow's Failed state for an expected error
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BaseException as error:
        if not (name := startup.stop_signal(error)):
            raise
        print(f"pipeline stopped by {name}", file=sys.stderr)
        return 130
    if "register" in names:
        print(outcome_line(record))  # the result, as the last line
    else:
        print(f"ran {', '.join(names)} in {Path(args.workdir).resolve()}")
    return 0


if __name__ == "__main__":
    startup.exit_without_teardown(main())
