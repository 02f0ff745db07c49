"""Collects README.md as tests (tests/helpers/readme.py says how each block runs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers.readme import Shell, readme_sybil

pytest_collect_file = readme_sybil().pytest()
# The suite's shared fixtures, by concern (pytest reads pytest_plugins in the root conftest).
pytest_plugins = ["tests.fixtures.pipeline", "tests.fixtures.servers"]


def pytest_collection_modifyitems(items):
    """The README's blocks run whole pipelines: they belong to the slow tier."""
    for item in items:
        if item.path.name == "README.md":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def readme_shell(tmp_path_factory):
    """A fresh clone of this checkout, its `.venv` the suite's own virtualenv (what `make
    venv` builds there, so `make` targets find it up to date), and a shell with a
    temporary HOME and nothing else of this process's environment."""
    from benchmarks.common import copy_repo

    root = copy_repo(tmp_path_factory.mktemp("readme") / "gpu-train-pipeline")
    venv = Path(sys.prefix)
    (root / ".venv").symlink_to(venv)
    if (stamp := venv / ".installed").exists():  # make's rule: stamp newer than its inputs
        built = stamp.stat().st_mtime - 60
        for name in ("pyproject.toml", "requirements.lock"):
            os.utime(root / name, (built, built))
    shell = Shell.fresh(root, tmp_path_factory.mktemp("home"))
    try:
        yield shell
    finally:
        shell.stop()
