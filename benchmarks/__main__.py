"""Run every benchmark, each in its own process, then write BENCHMARKS.md from the results.

python -m benchmarks            # full sizes, about 90 minutes on 2 CPU cores
python -m benchmarks --quick    # tiny sizes, a few minutes: checks the code only
python -m benchmarks --only stages --only time_to_accuracy
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

from benchmarks.common import REPO, log, python_module
from benchmarks.report import write_report

SECTIONS = (
    "input_pipeline",
    "train_throughput",
    "stages",
    "time_to_accuracy",
    "inference",
    "transfer",
    "distributed",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes into results/quick/")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="repeatable")
    args = parser.parse_args(argv)
    failed = []
    for section in args.only or SECTIONS:
        cmd = python_module(f"benchmarks.{section}", *(["--quick"] if args.quick else []))
        log(f"{section}: {shlex.join(cmd)}")
        start = time.perf_counter()
        status = subprocess.run(cmd, cwd=REPO).returncode
        outcome = "done" if status == 0 else f"FAILED (exit {status})"
        log(f"{section}: {outcome} in {time.perf_counter() - start:.0f} s")
        if status:
            failed.append(section)
    log(f"wrote {write_report(args.quick)}")
    if failed:
        log(f"failed: {', '.join(failed)} (their previous results, if any, were kept)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
