"""Command-line entry point for one stage, as dvc.yaml calls it: ``python -m flows.stage train``.

Runs in the current directory (the repository root under `dvc repro`) with params.yaml
from there. Expected failures (bad config, missing or damaged input files) print one
clear message and exit with status 2 instead of a traceback, and leave no MLflow run
RUNNING (see `close_failed_pipeline_run`).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from tasks import startup
from tasks.config import PipelineConfig, load_config
from tasks.errors import UserFixableError, os_error_line, user_fixable_os_error
from tasks.workspace import Workspace

STAGE_NAMES = ("data", "preprocess", "train", "evaluate", "register", "export")


def stage_functions() -> dict[str, Callable[[PipelineConfig, Workspace], Any]]:
    """Stage name -> the one function that implements it (shared with the Prefect flow).

    Each stage's module (tasks/stages/<name>.py) is imported when that stage runs, never
    another's: a process runs only the code its stage's dvc.yaml deps list."""

    def runner(name: str) -> Callable[[PipelineConfig, Workspace], Any]:
        def run(cfg: PipelineConfig, ws: Workspace) -> Any:
            return importlib.import_module(f"tasks.stages.{name}").run(cfg, ws)

        return run

    return {name: runner(name) for name in STAGE_NAMES}


CLOSING_STAGE = STAGE_NAMES[-1]  # ends the pipeline's MLflow run
# Stages that run Keras; data (synthetic, idx) and preprocess (DALI) need no TensorFlow.
TENSORFLOW_STAGES = ("train", "evaluate", "register", "export")


class StageFailed(RuntimeError):
    """A stage raised; the message names the stage and the cause (the original is chained).

    Built from strings only, so it survives pickling into a Prefect state unchanged.
    """

    def __init__(self, stage: str, cause: str, expected: bool = False) -> None:
        super().__init__(stage, cause, expected)
        self.stage, self.cause = stage, cause
        self.expected = expected  # a problem the user fixes (bad input), not a bug

    def __str__(self) -> str:
        return f"stage {self.stage!r} failed: {self.cause}"

    @classmethod
    def wrap(cls, stage: str, error: BaseException) -> StageFailed:
        return cls(stage, describe(error), is_expected(error))


def is_expected(error: BaseException) -> bool:
    """A failure the user fixes: reported as one line, without a traceback."""
    if isinstance(error, StageFailed):
        return error.expected
    return isinstance(error, expected_errors()) or user_fixable_os_error(error) is not None


def describe(error: BaseException, with_type: bool = True) -> str:
    """The one line for a failure: a disk-full or permission error names its path, what its
    errno means and the fix; others their message (after their type, unless not asked)."""
    if (os_error := user_fixable_os_error(error)) is not None:
        return os_error_line(os_error)
    return f"{type(error).__name__}: {error}" if with_type else str(error)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user fixes (config, input files, a server to start), reported as one line
    without a traceback: tasks.errors.UserFixableError and its kin, a missing file, a stage
    that failed on one. Anything else is a bug and keeps its traceback."""
    return (UserFixableError, FileNotFoundError, StageFailed)


def close_failed_pipeline_run(ws: Workspace, stage: str, error: BaseException) -> None:
    """Mark the pipeline run this stage (or an earlier one) left open FAILED, and drop its
    handle, with the cause in the run's end-reason tag.

    Under `dvc repro` the run stays open between stage processes, and a transient failure
    (an offline download) leaves it RUNNING inside `runs.stage_run` so that a Prefect
    retry in the same flow can join it. A stage process that exits has no retry to come:
    the run ends FAILED now, and the next `dvc repro` starts a run of its own.
    """
    from tasks.tracking import runs

    if not ws.run_handle.is_file():
        return
    reason = f"stage {stage}: {describe(error)}"
    with suppress(Exception):  # the stage's own error is the one to report
        runs.end_pipeline_run(ws, "FAILED", keep_handle=False, reason=reason)


def uses_tensorflow(stage: str, cfg: PipelineConfig) -> bool:
    """The stages that run Keras, and the data stage when TFDS (built on TensorFlow) reads."""
    return stage in TENSORFLOW_STAGES or (stage == "data" and cfg.data.source == "tfds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__)
    parser.add_argument("stage", choices=STAGE_NAMES)
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml")
    args = parser.parse_args(argv)
    if note := startup.prepare_process():
        print(note, file=sys.stderr)
    ws = Workspace(Path.cwd())
    # SIGTERM (dvc's or a scheduler's stop) unwinds like Ctrl-C: the MLflow run ends KILLED.
    signal.signal(signal.SIGTERM, startup.raise_interrupted)
    # Ctrl-C too when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cfg = load_config(args.params)
        if uses_tensorflow(args.stage, cfg):  # quietly now: it loads it anyway
            startup.import_tensorflow()
        stage_functions()[args.stage](cfg, ws)
        if args.stage == CLOSING_STAGE and ws.registration.is_file():
            from flows.reporting import outcome_line
            from tasks.workspace import read_json

            print(outcome_line(read_json(ws.registration)), flush=True)  # `dvc repro`'s result
    except KeyboardInterrupt as error:
        print(f"stage {args.stage!r} stopped by {str(error) or 'SIGINT'}", file=sys.stderr)
        return 130
    except Exception as error:
        close_failed_pipeline_run(ws, args.stage, error)  # never left open, whatever failed
        if not is_expected(error):
            raise  # a bug: its traceback follows
        print(f"error in stage {args.stage!r}: {describe(error, False)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from flows import stagehost  # under `dvc repro`: in a warm process when one serves

    sys.exit(stagehost.entry(sys.argv[1:], main))
