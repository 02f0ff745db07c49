"""A parameter sweep: one training pipeline per point, run concurrently, one model registered.

    prefect deployment run 'training-sweep/sweep' \\
      -p grid='{"train.learning_rate": [0.001, 0.003]}' --watch

Every point is checked against the config schema before anything starts. Each point is a
flow run of the pipeline deployment (its own process on the worker, writing to
runs/<sweep-flow-run-id>/point-<i>/) that stops after evaluate, as an MLflow child run
of one parent run; at most ``max_parallel`` run at once. The best point by test accuracy
then goes through the register stage, the same promotion rule as any pipeline run; the
other points are never registered.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import reporting
from flows.common import failed_without_traceback
from flows.pipeline import resolve_config, resolve_run_config, run_stage
from flows.reporting import outcome_line
from flows.stage import STAGE_NAMES
from tasks.config import ConfigError, PipelineConfig
from tasks.tracking import runs
from tasks.workspace import Workspace, read_json

PIPELINE_DEPLOYMENT = "training-pipeline/train"
POINT_STAGES = [name for name in STAGE_NAMES if name not in ("register", "export")]
POLL_S = 2.0  # how often the sweep looks at its points' flow runs
# A sweep compares points within one tracking store and registers one model: points may
# not move either, only the base overrides may.
SWEEP_WIDE_PREFIXES = ("mlflow.", "register.")


def expand_points(
    grid: dict[str, list[Any]] | None, points: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The sweep's points: every combination of ``grid`` values, or the ``points`` list."""
    if (grid is None) == (points is None):
        raise ConfigError("a sweep takes exactly one of grid (key -> values) or points")
    if grid is not None:
        empty = [key for key, values in grid.items() if not isinstance(values, list) or not values]
        if not grid or empty:
            raise ConfigError(f"sweep grid needs a non-empty list of values per key {empty}")
        return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    if not points or not all(isinstance(point, dict) for point in points):
        raise ConfigError("sweep points must be a non-empty list of {dotted key: value}")
    return [dict(point) for point in points]


def validate_points(
    points: list[dict[str, Any]], base: dict[str, Any], params_path: str, profile: str | None
) -> PipelineConfig:
    """Check every point's full config before any work; return the base config."""
    project = Workspace(Path.cwd())
    for index, point in enumerate(points):
        sweep_wide = sorted(key for key in point if key.startswith(SWEEP_WIDE_PREFIXES))
        if sweep_wide:
            raise ConfigError(
                f"sweep point {index} sets {sweep_wide}: mlflow.* and register.* apply to the "
                "whole sweep; put them in overrides"
            )
        try:
            resolve_config(project, params_path, profile, base | point)
        except ConfigError as error:
            raise ConfigError(f"sweep point {index} {point}: {error}") from None
    return resolve_config(project, params_path, profile, base)


@flow(name="training-sweep", log_prints=True)
def training_sweep(
    grid: dict[str, list[Any]] | None = None,
    points: list[dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    max_parallel: int = 2,
    params_path: str = "params.yaml",
    profile: str | None = None,
    pipeline_deployment: str = PIPELINE_DEPLOYMENT,
) -> dict[str, Any]:
    """Train one pipeline per point, register the best.

    grid: dotted key -> list of values; the sweep runs every combination.
    points: or an explicit list of {dotted key: value} points.
    overrides: applied to every point (e.g. {"train.epochs": 3}).
    max_parallel: points running at once (each is a training process on the worker).
    pipeline_deployment: the deployment each point runs as.
    """
    try:
        base = overrides or {}
        sweep_dir = Path("runs") / str(flow_run.get_id())
        # A deployment run reads and writes only inside the project: checked before any read.
        resolve_run_config(Workspace(sweep_dir.resolve()), params_path, profile, base)
        point_list = expand_points(grid, points)
        base_cfg = validate_points(point_list, base, params_path, profile)
        if max_parallel < 1:
            raise ConfigError(f"max_parallel must be >= 1, got {max_parallel}")
        check_deployment(pipeline_deployment)
    except Exception as error:  # a bad point or parameter: one message, no traceback
        return failed_without_traceback(error)
    parent_id = runs.start_sweep_run(
        base_cfg, Workspace(Path.cwd()), f"sweep-{flow_run.get_name()}", point_list
    )
    get_run_logger().info("MLflow parent run %s, %d points", parent_id, len(point_list))
    try:
        parameters = [
            point_parameters(base | point, sweep_dir / f"point-{i}", parent_id, params_path)
            | {"profile": profile}
            for i, point in enumerate(point_list)
        ]
        flow_runs = run_points(pipeline_deployment, parameters, max_parallel)
        results = collect_results(point_list, parameters, flow_runs)
        best = max(range(len(results)), key=lambda i: results[i]["test_accuracy"])
        record = register_point(results[best], base, params_path, profile)
    except BaseException:
        runs.end_run_quietly(parent_id, "FAILED")
        raise
    record_sweep(parent_id, results, best, record)
    publish_sweep_summary(parent_id, results, best, record)
    winner = json.dumps(point_list[best], sort_keys=True)
    get_run_logger().info("sweep winner: point %d %s; %s", best, winner, outcome_line(record))
    return {"parent_run_id": parent_id, "points": results, "best": best, "registration": record}


def check_deployment(name: str) -> None:
    """Fail before any work when the pipeline deployment the points run as is missing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"deployment {name!r} not found: run `prefect deploy --all` (or `make serve`)"
            ) from None


def point_parameters(
    overrides: dict[str, Any], workdir: Path, parent_id: str, params_path: str
) -> dict[str, Any]:
    """The pipeline flow's parameters for one point: no register, nested under the parent."""
    return {
        "overrides": overrides,
        "workdir": str(workdir),
        "params_path": params_path,
        "stages": POINT_STAGES,
        "parent_run_id": parent_id,
    }


def run_points(deployment: str, parameters: list[dict[str, Any]], max_parallel: int) -> list[Any]:
    """One flow run of ``deployment`` per parameter set, at most ``max_parallel`` at a time.

    Runs are created from this thread only (Prefect links each as a subflow of the sweep)
    and watched by polling; returns their final flow runs in point order.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    waiting = list(enumerate(parameters))
    running: dict[int, Any] = {}
    finished: dict[int, Any] = {}
    with get_client(sync_client=True) as client:
        while waiting or running:
            while waiting and len(running) < max_parallel:
                index, params = waiting.pop(0)
                name = f"{flow_run.get_name()}-point-{index}"
                running[index] = run_deployment(
                    deployment, parameters=params, timeout=0, flow_run_name=name
                ).id
            time.sleep(POLL_S)
            for index, run_id in list(running.items()):
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    finished[index] = client.read_flow_run(run_id)
                    del running[index]
                    get_run_logger().info(
                        "point %d of %d (%s) %s",
                        index,
                        len(parameters),
                        finished[index].name,
                        state.name,
                    )
    return [finished[index] for index in range(len(parameters))]


def collect_results(
    points: list[dict[str, Any]], parameters: list[dict[str, Any]], flow_runs: list[Any]
) -> list[dict[str, Any]]:
    """Per point: its flow run, MLflow run and test accuracy; raise if any point failed."""
    failed = [
        f"point {i} ({run.name}): {run.state.name}: {run.state.message}"
        for i, run in enumerate(flow_runs)
        if not run.state.is_completed()
    ]
    if failed:
        raise RuntimeError("sweep points failed, nothing registered:\n  " + "\n  ".join(failed))
    results = []
    for point, params, run in zip(points, parameters, flow_runs, strict=True):
        ws = Workspace(Path(params["workdir"]).resolve())
        results.append(
            {
                "point": point,
                "flow_run": run.name,
                "flow_run_id": str(run.id),
                "workdir": str(ws.root),
                "run_id": runs.handle_run_id(ws),
                "test_accuracy": read_json(ws.metrics)["test"]["accuracy"],
            }
        )
    return results


def register_point(
    result: dict[str, Any], base: dict[str, Any], params_path: str, profile: str | None
) -> dict[str, Any]:
    """Register and export the point's model through the register and export stages, in the
    point's own MLflow run; return the registration record with the export's parity."""
    ws = Workspace(Path(result["workdir"]))
    cfg = resolve_config(ws, params_path, profile, base | result["point"])
    runs.reopen_pipeline_run(ws)
    record = run_stage("register", cfg, ws)
    return record | {"exports": run_stage("export", cfg, ws)}


def record_sweep(
    parent_id: str, results: list[dict[str, Any]], best: int, record: dict[str, Any]
) -> None:
    """Per-point accuracies, the winner and its registered version on the parent run."""
    import mlflow

    client = mlflow.MlflowClient()
    for index, result in enumerate(results):
        client.log_metric(parent_id, "point_test_accuracy", result["test_accuracy"], step=index)
    client.log_metric(parent_id, "best_test_accuracy", results[best]["test_accuracy"])
    for key, value in {
        "sweep.best_point": str(best),
        "sweep.best_run_id": results[best]["run_id"],
        "registered.version": record["version"],
        "registered.promoted": str(record["promoted"]),
    }.items():
        client.set_tag(parent_id, key, value)
    client.log_text(parent_id, json.dumps(results, indent=2), "sweep/results.json")
    client.set_terminated(parent_id, "FINISHED")


def publish_sweep_summary(
    parent_id: str, results: list[dict[str, Any]], best: int, record: dict[str, Any]
) -> None:
    from prefect.artifacts import create_markdown_artifact

    rows = [
        (
            f"{'**best** ' if i == best else ''}point {i}",
            f"`{json.dumps(r['point'])}` accuracy {r['test_accuracy']:.4f}, MLflow run "
            f"`{r['run_id']}`",
        )
        for i, r in enumerate(results)
    ]
    aliases = ", ".join(record["aliases"])
    rows += [
        ("MLflow parent run", f"`{parent_id}`"),
        ("Registered", f"{record['model_name']} v{record['version']} ({aliases})"),
    ]
    markdown = "## Sweep summary\n\n" + reporting.markdown_table(rows, ("Sweep", "Result"))
    create_markdown_artifact(key="sweep-summary", markdown=markdown, description="Sweep summary")
