"""What the register stage does with the data a version stands on (tasks/tracking/lineage.py
keep_in_dvc): every file content-addressed in the project's DVC cache and on its default
remote, nothing in git or dvc.lock, and a push that fails stops it with the remote named.
Real DVC, in a temporary git + DVC project; the origins end to end are in test_reproduce.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tasks.errors import DataStorageError
from tasks.tracking.lineage import dvc_hash, keep_in_dvc
from tests.helpers.project import module_command


def objects(folder: Path) -> set[str]:
    """The md5 names of the objects in a DVC cache or local remote."""
    return {f"{p.parent.name}{p.name}" for p in (folder / "files" / "md5").glob("*/*")}


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    for args in (("init", "-q"), ("remote", "add", "-d", "storage", str(tmp_path / "remote"))):
        subprocess.run(module_command("dvc", *args), cwd=root, check=True)
    prepared = root / "runs" / "a1" / "data" / "prepared"  # a flow run's directory
    prepared.mkdir(parents=True)
    for name, content in {"train.npz": b"train", "test.npz": b"test", "meta.json": b"{}"}.items():
        (prepared / name).write_bytes(content)
    return root


def test_a_flow_runs_data_lands_in_the_cache_and_on_the_remote_file_by_file(project, tmp_path):
    prepared = project / "runs" / "a1" / "data" / "prepared"
    status_before = subprocess.run(
        ["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True
    ).stdout
    kept = keep_in_dvc(prepared.parents[1], {"data/prepared": prepared})
    version = dvc_hash(prepared)
    assert kept.hashes == {"data/prepared": version}
    assert kept.storage == f"DVC remote 'storage' ({tmp_path / 'remote'})"
    listing = version.removesuffix(".dir")
    files = {dvc_hash(path) for path in prepared.iterdir()}
    assert {f"{listing}.dir", *files} <= objects(tmp_path / "remote"), "listing and every file"
    assert {f"{listing}.dir", *files} <= objects(project / ".dvc" / "cache")
    status_after = subprocess.run(
        ["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True
    ).stdout
    assert status_after == status_before, "no .dvc file, nothing for git"
    assert keep_in_dvc(prepared.parents[1], {"data/prepared": prepared}) == kept, "idempotent"


def test_without_a_remote_the_data_stays_in_the_cache_and_the_tag_says_so(project):
    subprocess.run(module_command("dvc", "remote", "default", "--unset"), cwd=project, check=True)
    prepared = project / "runs" / "a1" / "data" / "prepared"
    kept = keep_in_dvc(prepared.parents[1], {"data/prepared": prepared})
    assert kept.remote is None
    assert kept.storage.startswith("DVC cache only (") and "no DVC remote" in kept.storage


def test_a_remote_that_cannot_be_written_stops_registration_naming_it(project, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the remote's folder should be")
    url = str(blocked / "remote")
    subprocess.run(
        module_command("dvc", "remote", "modify", "--local", "storage", "url", url),
        cwd=project,
        check=True,
    )
    prepared = project / "runs" / "a1" / "data" / "prepared"
    with pytest.raises(DataStorageError) as raised:
        keep_in_dvc(prepared.parents[1], {"data/prepared": prepared})
    message = str(raised.value)
    assert f"DVC remote 'storage' ({url}) failed" in message, message
    assert dvc_hash(prepared) in message and "nothing was registered" in message


def test_dvc_exp_temp_workspaces_keep_data_in_the_projects_cache_and_remote(tmp_path):
    """`dvc exp run --temp` (and `--queue`) run in <project>/.dvc/tmp/exps/<name>/, a copy
    whose .dvc/config names the remote relative to itself: data must still go to the
    project's remote, not to a folder inside .dvc/tmp/."""
    project = tmp_path / "project"
    workspaces = [project, project / ".dvc" / "tmp" / "exps" / "tmp1a2b"]
    for root in workspaces:
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        if not (root / ".dvc" / "config").is_file():
            subprocess.run(module_command("dvc", "init", "-q", "--force"), cwd=root, check=True)
        # As this repository's .dvc/config has it: a folder beside the clone, written
        # relative to .dvc/ ("../../storage"; the command takes it from the current folder).
        add = ("remote", "add", "-f", "-d", "storage", "../storage")
        subprocess.run(module_command("dvc", *add), cwd=root, check=True)
    prepared = workspaces[1] / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "train.npz").write_bytes(b"experiment")
    kept = keep_in_dvc(workspaces[1], {"data/prepared": prepared})
    assert kept.storage == f"DVC remote 'storage' ({tmp_path / 'storage'})"
    assert f"{kept.hashes['data/prepared'].removesuffix('.dir')}.dir" in objects(
        tmp_path / "storage"
    )
    assert "../../storage" in (workspaces[1] / ".dvc" / "config").read_text()
    assert not (project / ".dvc" / "tmp" / "exps" / "storage").exists()
