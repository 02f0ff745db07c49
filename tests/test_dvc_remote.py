"""The DVC remote: what `dvc push` sends, a fresh clone gets back with `dvc pull`, hash for hash.

As the README's "Operate" section does it: the default remote is a directory beside the
repository (shared by clones in the same parent folder); as its "Team setup" does it, a
remote on an S3-compatible store (moto's emulator here) added with one command per clone.
The pipeline runs once, on tiny synthetic data.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.common import locked_data_version
from flows.retrain import check_out_data
from tasks.tracking.lineage import dvc_hash
from tests.helpers.operate import BIN

pytestmark = pytest.mark.slow
DEFAULT_REMOTE = "gpu-train-pipeline-dvc-storage"  # .dvc/config: ../../<this>


def run(root: Path, *command: str, env: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | (env or {})
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


def dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return run(root, str(BIN / "dvc"), *args, env=env)


def git(root: Path, *args: str) -> str:
    return run(root, "git", "-c", "user.name=test", "-c", "user.email=t@example.invalid", *args)


def locked_outs(root: Path) -> dict[str, str]:
    """path -> md5 of every output dvc.lock records."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def assert_restored(clone: Path, origin: Path) -> None:
    outs = locked_outs(clone)
    assert {"data/prepared", "data/preprocess", "models/model.keras"} <= set(outs)
    for path, md5 in outs.items():
        restored = clone / path
        if restored.is_dir():
            assert dvc_hash(restored) == md5, path
            for file in (origin / path).rglob("*"):
                if file.is_file():
                    assert (
                        restored / file.relative_to(origin / path)
                    ).read_bytes() == file.read_bytes()
        else:
            assert hashlib.md5(restored.read_bytes()).hexdigest() == md5, path
    assert "up to date" in dvc(clone, "status")


def test_push_then_pull_in_a_fresh_clone_restores_identical_outputs(tiny_repro, s3_store, tmp_path):
    # A copy of the session's repository right after `dvc repro` of the tiny params
    # (tests/fixtures/pipeline.py), in a parent folder of its own that the clones share.
    origin = tiny_repro.origin
    team = origin.parent
    assert "up to date" in dvc(origin, "status"), "the copy is what the repro left"
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "data version")

    # The default remote: a directory beside the repository (relative to .dvc/).
    url = dvc(origin, "config", "remote.storage.url").strip()
    assert (origin / ".dvc" / url).resolve() == team / DEFAULT_REMOTE
    dvc(origin, "push")
    assert (team / DEFAULT_REMOTE / "files" / "md5").is_dir()
    git(team, "clone", "-q", str(origin), "clone")
    dvc(team / "clone", "pull")
    assert_restored(team / "clone", origin)

    # The nightly retrain's checkout: a clone without the data pulls the locked version.
    git(team, "clone", "-q", str(origin), "retrain")
    version = locked_data_version(team / "retrain")
    prepared = check_out_data.fn(team / "retrain", version)
    assert prepared == team / "retrain" / "data" / "prepared" and dvc_hash(prepared) == version

    # A team's object store (README "Team setup"): the S3 emulator, its credential from
    # the environment; one `dvc remote add` per clone (real S3, MinIO, GCS alike).
    elsewhere = ("team", f"s3://{s3_store.bucket}/dvc")
    endpoint = ("team", "endpointurl", s3_store.endpoint)
    dvc(origin, "remote", "add", "--local", *elsewhere)
    dvc(origin, "remote", "modify", "--local", *endpoint)
    dvc(origin, "push", "-r", "team", env=s3_store.env)
    assert any(key.startswith("dvc/files/md5/") for key in s3_store.keys("dvc/"))
    git(tmp_path, "clone", "-q", str(origin), "second-machine")
    second = tmp_path / "second-machine"
    dvc(second, "remote", "add", "--local", *elsewhere)
    dvc(second, "remote", "modify", "--local", *endpoint)
    dvc(second, "pull", "-r", "team", env=s3_store.env)
    assert_restored(second, origin)
