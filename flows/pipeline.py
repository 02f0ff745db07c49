"""The training pipeline as a Prefect flow: data -> preprocess -> train -> evaluate -> register.

Each Prefect task calls the same stage function `dvc repro` runs (flows.stage), so the
two ways of running the pipeline cannot drift apart. Flow parameters are dotted-key
overrides of params.yaml, validated by the same schema before any work starts:

    python -m flows.pipeline train.epochs=3 data.source=synthetic
    prefect deployment run 'training-pipeline/local' -p overrides='{"train.epochs": 3}'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows.stage import STAGE_NAMES, expected_errors, stage_functions
from tasks import tracking
from tasks.config import PipelineConfig, load_config, load_profile, parse_override
from tasks.workspace import Workspace


@task(name="stage", task_run_name="{name}", cache_policy=None)
def run_stage(name: str, cfg: PipelineConfig, ws: Workspace) -> Any:
    """One pipeline stage; cache_policy=None: stages write files, they must always run."""
    return stage_functions()[name](cfg, ws)


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    overrides: dict[str, Any] | None = None,
    params_path: str = "params.yaml",
    workdir: str = ".",
    profile: str | None = None,
) -> dict[str, Any]:
    """Run every stage in ``workdir`` (outputs land where `dvc repro` puts them).

    overrides: dotted params.yaml keys to override, e.g. {"train.epochs": 3}.
    profile: a file of such overrides (profiles/*.yaml), applied before ``overrides``.
    """
    ws = Workspace(Path(workdir).resolve())
    cfg = resolve_config(ws, params_path, profile, overrides)  # fails here, before any work
    run_id = tracking.start_pipeline_run(cfg, ws, run_name=f"prefect-{flow_run.get_name()}")
    get_run_logger().info("MLflow run %s", run_id)
    results = {}
    for name in STAGE_NAMES:
        results[name] = run_stage(name, cfg, ws)
    return results["register"]


def resolve_config(
    ws: Workspace, params_path: str, profile: str | None, overrides: dict[str, Any] | None
) -> PipelineConfig:
    """params.yaml, then the profile's overrides, then explicit ones; validated once."""
    merged = load_profile(ws.resolve(profile)) if profile else {}
    return load_config(ws.resolve(params_path), merged | (overrides or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--profile", help="file of overrides, e.g. profiles/fast_fashion_mnist.yaml"
    )
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args(argv)
    # Paths typed on the command line are relative to the shell's directory.
    args.params = str(Path(args.params).resolve())
    args.profile = args.profile and str(Path(args.profile).resolve())
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
        # Validate here too, so a typo fails before a Prefect API is even started.
        resolve_config(Workspace(Path(args.workdir)), args.params, args.profile, overrides)
        record = training_pipeline(
            overrides=overrides, params_path=args.params, workdir=args.workdir, profile=args.profile
        )
    except expected_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"registered {record['model_name']} version {record['version']} {record['aliases']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
