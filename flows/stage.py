"""Command-line entry point for one stage, as dvc.yaml calls it: ``python -m flows.stage train``.

Runs in the current directory (the repository root under `dvc repro`) with params.yaml
from there. Expected failures (bad config, missing data) print one clear message and
exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.errors import ModelFileError
from tasks.tracking import raise_interrupted
from tasks.workspace import Workspace


def stage_functions() -> dict[str, Callable[[PipelineConfig, Workspace], Any]]:
    """Stage name -> the one function that implements it (shared with the Prefect flow)."""
    from tasks import data, evaluate, preprocess, register, train

    return {
        "data": data.run,
        "preprocess": preprocess.run,
        "train": train.run,
        "evaluate": evaluate.run,
        "register": register.run,
    }


STAGE_NAMES = ("data", "preprocess", "train", "evaluate", "register")


class StageFailed(RuntimeError):
    """A stage raised; the message names the stage and the cause (the original is chained).

    Built from strings only, so it survives pickling into a Prefect state unchanged.
    """

    def __init__(self, stage: str, cause: str) -> None:
        super().__init__(stage, cause)
        self.stage, self.cause = stage, cause

    def __str__(self) -> str:
        return f"stage {self.stage!r} failed: {self.cause}"

    @classmethod
    def wrap(cls, stage: str, error: BaseException) -> StageFailed:
        return cls(stage, f"{type(error).__name__}: {error}")


def expected_errors() -> tuple[type[BaseException], ...]:
    from tasks.data import DataUnavailableError

    return (ConfigError, DataUnavailableError, FileNotFoundError, ModelFileError, StageFailed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__)
    parser.add_argument("stage", choices=STAGE_NAMES)
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml")
    args = parser.parse_args(argv)
    # SIGTERM (dvc's or a scheduler's stop) unwinds like Ctrl-C: the MLflow run ends KILLED.
    signal.signal(signal.SIGTERM, raise_interrupted)
    # Ctrl-C too when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cfg = load_config(args.params)
        stage_functions()[args.stage](cfg, Workspace(Path.cwd()))
    except expected_errors() as error:
        print(f"error in stage {args.stage!r}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"stage {args.stage!r} stopped by {str(error) or 'SIGINT'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
