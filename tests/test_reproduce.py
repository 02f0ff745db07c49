"""Rebuild a registered version with one command (flows/reproduce/).

End to end: the real `dvc repro` registers version 1 in a temporary git copy of the
repository (tiny synthetic data, its own SQLite store and DVC cache), then
`python -m flows.reproduce` rebuilds it there from its tags, with real git and DVC. The
rule, the URI gate and the tag checks are also tested alone, without the pipeline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.common import copy_repo, set_params
from flows.reproduce.checkout import restore_data, temporary_checkout, with_data_version
from flows.reproduce.rules import (
    REPRODUCES_TAG,
    Rebuilt,
    Row,
    Rule,
    VersionRecord,
    choose_rule,
    compare,
    matches,
    parse_model_uri,
)
from flows.reproduce.runner import main, reproduce
from tasks.errors import ReproduceError
from tasks.tracking.lineage import dvc_hash
from tests.helpers.project import REPO, TINY, dvc_repro, module_command, pipeline_env

MODEL = "synthetic-seed_cnn"  # register.model_name: auto, on TINY synthetic data
COMPARED = ("test/accuracy", "test/loss", "test/macro_f1")
COMMIT = "4d7f1a53b6f8c87ceac391c5ad7ba3764dd8954c"
TAGS = {
    "git_commit": COMMIT,
    "data_version": "f85c24fa2e33b75702f93da59a115d1a.dir",
    "params": '{"train.epochs": 1}',
    "run_id": "1d0d516adb8e46018802e3fee8879ccf",
    "test_accuracy": "0.5",
}
SAME_LIBRARIES = {"tensorflow": "2.21.0", "keras": "3.15.1"}


# --- the pure part: URI gate, tags, rule -----------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "models:/cifar10-cnn/1;rm -rf ~",
        "models:/cifar10-cnn/$(id)",
        "models:/../1",
        "models:/cifar10-cnn/0",
        "models:/cifar10-cnn@champion",
        "models:/cifar10-cnn/1\n",
        "runs:/abc/model",
        "-models:/x/1",
    ],
)
def test_only_a_plain_model_version_uri_gets_past_the_gate(uri):
    with pytest.raises(ReproduceError, match="not a model version URI"):
        parse_model_uri(uri)
    assert parse_model_uri("models:/cifar10-cnn.v2_x/12") == ("cifar10-cnn.v2_x", "12")


def test_the_tags_are_validated_before_use():
    record = VersionRecord.from_tags(MODEL, "1", TAGS)
    assert (record.commit, record.dirty, record.deterministic) == (COMMIT, False, None)
    assert record.params == {"train.epochs": 1}
    dirty = VersionRecord.from_tags(MODEL, "1", TAGS | {"git_commit": f"{COMMIT}-dirty"})
    assert dirty.dirty and dirty.commit == COMMIT
    with pytest.raises(ReproduceError, match="no data_version, params tag"):
        VersionRecord.from_tags(
            MODEL, "1", {k: TAGS[k] for k in ("git_commit", "run_id")} | {"test_accuracy": "1"}
        )
    for key, bad in [("git_commit", "unknown"), ("data_version", "x; rm"), ("run_id", "../x")]:
        with pytest.raises(ReproduceError, match=f"its {key} tag"):
            VersionRecord.from_tags(MODEL, "1", TAGS | {key: bad})
    with pytest.raises(ReproduceError, match="params tag"):
        VersionRecord.from_tags(MODEL, "1", TAGS | {"params": "[1, 2]"})


def test_exact_only_when_determinism_and_library_versions_are_recorded_and_equal():
    versions = {"tensorflow": "2.21.0", "keras": "3.15.1", "python": "3.11.7"}
    recorded = TAGS | {"deterministic": "true", "versions": json.dumps(versions)}
    original = VersionRecord.from_tags(MODEL, "1", recorded)
    assert choose_rule(original, Rebuilt(True, SAME_LIBRARIES), 1e-6).exact
    newer_keras = Rebuilt(True, SAME_LIBRARIES | {"keras": "3.16.0"})
    assert "keras was 3.15.1, now 3.16.0" in choose_rule(original, newer_keras, 1e-6).reason
    assert not choose_rule(original, Rebuilt(False, SAME_LIBRARIES), 1e-6).exact
    unknown = choose_rule(VersionRecord.from_tags(MODEL, "1", TAGS), Rebuilt(True, {}), 1e-6)
    assert not unknown.exact and unknown.tolerance == 1e-6
    assert "determinism is unknown" in unknown.reason


def test_a_match_needs_every_metric_within_the_rule():
    original = {"test/accuracy": 0.5, "test/loss": 1.0, "per_class/f1_cat": 0.25, "loss": 9.0}
    close = {"test/accuracy": 0.5, "test/loss": 1.0 + 5e-7, "per_class/f1_cat": 0.25}
    rows = compare(original, close)
    assert [row.metric for row in rows] == ["test/accuracy", "test/loss", "per_class/f1_cat"]
    # A version registered before the chart sections logged test_accuracy, test_f1_<class>.
    legacy = {"test_accuracy": 0.5, "test_loss": 1.0, "test_f1_cat": 0.25, "loss": 9.0}
    assert compare(legacy, close) == rows
    record = VersionRecord.from_tags(MODEL, "1", TAGS)
    tolerant = choose_rule(record, Rebuilt(True, SAME_LIBRARIES), 1e-6)
    assert matches(rows, tolerant)
    exact = Rule(exact=True, tolerance=0.0, reason="test")
    assert not matches(rows, exact)
    assert not matches(compare(original, close | {"per_class/f1_dog": 0.5}), tolerant), "missing"
    assert Row("m", None, 1.0).difference is None


def test_the_data_version_is_pinned_into_any_dvc_lock():
    pinned = with_data_version({}, TAGS["data_version"])
    assert pinned["stages"]["data"]["outs"] == [
        {"path": "data/prepared", "hash": "md5", "md5": TAGS["data_version"]}
    ]
    lock = {"schema": "2.0", "stages": {"data": {"cmd": "x", "outs": [{"path": "data/prepared"}]}}}
    lock["stages"]["train"] = {"cmd": "y"}
    repinned = with_data_version(lock, TAGS["data_version"])
    assert repinned["stages"]["train"] == {"cmd": "y"}
    assert repinned["stages"]["data"]["outs"][0]["md5"] == TAGS["data_version"]


def test_the_flow_and_its_deployment_run_the_same_checked_function():
    state = reproduce.fn("models:/cifar10-cnn/1; rm -rf ~")
    assert state.is_failed() and "not a model version URI" in state.message
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    (entry,) = [d for d in deployments if d["entrypoint"] == "flows/reproduce/runner.py:reproduce"]
    assert reproduce.name == "reproduce-version" and entry["name"] == "reproduce"
    assert "model_uri" in reproduce.parameters.properties


# --- end to end: a version registered by `dvc repro`, rebuilt ------------------------


def git(root: Path, *args: str) -> str:
    ident = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    done = subprocess.run(["git", *ident, *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git copy of the repository with tiny params committed (so version 1's commit is
    clean), and version 1 registered by the real `dvc repro`. Shared by the tests below."""
    root = copy_repo(tmp_path_factory.mktemp("repo"))
    set_params(root, TINY)
    git(root, "commit", "-qam", "tiny params")
    dvc_repro(root)
    return root


@pytest.fixture(scope="module")
def client(project):
    import mlflow

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs(client) -> list:
    experiment = client.get_experiment_by_name("synthetic")
    return client.search_runs([experiment.experiment_id])


def version_count(client) -> int:
    return len(client.search_model_versions(f"name = '{MODEL}'"))


def checkouts(root: Path) -> list[str]:
    return [
        line
        for line in git(root, "worktree", "list", "--porcelain").splitlines()
        if line.startswith("worktree ")
    ]


@pytest.fixture
def cli(project, monkeypatch, capsys):
    """``main(argv)`` in the project, as `python -m flows.reproduce` runs it: (status,
    stdout, stderr). The signal handlers main installs are put back afterwards."""
    monkeypatch.chdir(project)

    def run(*argv: str) -> tuple[int, str, str]:
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            status = main(list(argv))
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.mark.slow
def test_a_registered_version_is_rebuilt_from_its_tags_and_matches(project, client):
    before = {run.info.run_id for run in runs(client)}
    versions = version_count(client)
    env = pipeline_env()
    done = subprocess.run(
        module_command("flows.reproduce", f"models:/{MODEL}/1"),
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "metric" in done.stdout and "reproduction" in done.stdout
    assert "result: MATCH" in done.stdout
    # Version 1 is tagged deterministic with its library versions: the exact rule applies.
    assert "rule: exact" in done.stdout, done.stdout[-2000:]
    assert version_count(client) == versions, "a reproduction never registers"

    (new,) = [run for run in runs(client) if run.info.run_id not in before]
    assert new.info.status == "FINISHED"
    assert new.data.tags[REPRODUCES_TAG] == f"{MODEL}/1"
    assert new.data.tags[f"{REPRODUCES_TAG}.match"] == "true"
    original = client.get_run(client.get_model_version(MODEL, "1").run_id)
    assert new.data.tags["pipeline.git_commit"] == original.data.tags["pipeline.git_commit"]
    compared = [k for k in original.data.metrics if k in COMPARED]
    assert len(compared) == 3
    for key in compared:
        assert new.data.metrics[key] == original.data.metrics[key], key
    # Per-class F1 is compared from each run's evaluate/per_class.json: the MATCH covers it.
    assert "per_class/f1_class_9" in done.stdout, done.stdout[-2000:]
    assert checkouts(project) == [f"worktree {project}"], "the temporary checkout is gone"
    checkout = next(line for line in done.stdout.splitlines() if "rerunning" in line).split()[-1]
    assert not Path(checkout).exists()


@pytest.mark.slow
def test_a_stopped_reproduction_stops_its_pipeline_and_removes_its_checkout(
    project, client, tmp_path
):
    """SIGTERM while the pipeline runs: exit 130, its MLflow run ended (not RUNNING) and
    tagged, no checkout left behind."""
    before = {run.info.run_id for run in runs(client)}
    env = pipeline_env()
    with (tmp_path / "output.log").open("w") as log:
        process = subprocess.Popen(
            module_command("flows.reproduce", f"models:/{MODEL}/1"),
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not [run for run in runs(client) if run.info.run_id not in before]:
            assert process.poll() is None and time.monotonic() < deadline, "no run started"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=120)
    output = (tmp_path / "output.log").read_text()
    assert status == 130, output[-3000:]
    assert "reproduction stopped by SIGTERM" in output
    (stopped,) = [run for run in runs(client) if run.info.run_id not in before]
    assert stopped.info.status != "RUNNING"  # KILLED, or FINISHED when it ended first
    assert stopped.data.tags[REPRODUCES_TAG] == f"{MODEL}/1"
    assert checkouts(project) == [f"worktree {project}"]


@pytest.fixture(scope="module")
def foreign_versions(project, client) -> dict[str, str]:
    """Versions the pipeline cannot rebuild, registered by hand: name -> version."""
    v1 = client.get_model_version(MODEL, "1")
    source = f"{client.get_run(v1.run_id).info.artifact_uri}/model"
    unknown_commit = v1.tags | {"git_commit": "0123456789abcdef0123456789abcdef01234567"}
    dirty = v1.tags | {"git_commit": f"{v1.tags['git_commit']}-dirty"}
    return {
        kind: client.create_model_version(MODEL, source, tags=tags).version
        for kind, tags in [("untagged", {}), ("unknown commit", unknown_commit), ("dirty", dirty)]
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("models:/cifar10-cnn/1 && id", "is not a model version URI"),
        ("models:/no-such-model/1", "no registered model 'no-such-model'"),
        (f"models:/{MODEL}/999", f"does not exist: '{MODEL}' has versions 1 to"),
        ("untagged", "registered by something else"),
        ("unknown commit", "which the git repository at"),
        ("dirty", "the difference was never recorded, so git cannot rebuild it"),
    ],
)
def test_a_version_that_cannot_be_rebuilt_is_refused_in_one_line(
    cli, client, foreign_versions, project, target, message
):
    uri = f"models:/{MODEL}/{foreign_versions[target]}" if target in foreign_versions else target
    before = len(runs(client))
    status, out, err = cli(uri)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert out == "", "refused before any work"
    assert len(runs(client)) == before, "no MLflow run opened"
    assert checkouts(project) == [f"worktree {project}"]


@pytest.mark.slow
def test_the_command_line_refuses_with_one_line_and_status_2(project):
    env = pipeline_env()
    done = subprocess.run(
        module_command("flows.reproduce", f"models:/{MODEL}/999"),
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: models:/{MODEL}/999 does not exist: '{MODEL}' has versions")


@pytest.fixture
def data_version_gone(project, client, tmp_path):
    """Version 1's data version neither in the project's DVC cache nor on its remote: one
    byte of data/prepared changed since registration, the cache's directory object moved
    away, the remote an empty directory. Everything is put back afterwards."""
    version = client.get_model_version(MODEL, "1").tags["data_version"]
    prepared = project / "data" / "prepared" / "train.npz"
    original = prepared.read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 0xFF
    prepared.write_bytes(bytes(changed))
    cached = project / ".dvc" / "cache" / "files" / "md5" / version[:2] / version[2:]
    aside = tmp_path / cached.name
    cached.rename(aside)
    dvc(project, "remote", "modify", "--local", "storage", "url", str(tmp_path / "empty"))
    try:
        assert dvc_hash(project / "data" / "prepared") != version
        yield version
    finally:
        aside.rename(cached)
        prepared.write_bytes(original)
        (project / ".dvc" / "config.local").unlink()


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run(module_command("dvc", *args), cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_a_data_version_dvc_cannot_restore_is_refused_naming_its_hash(
    cli, client, project, data_version_gone
):
    before = len(runs(client))
    status, _, err = cli(f"models:/{MODEL}/1")
    assert status == 2
    assert err.count("\n") == 1 and data_version_gone in err and "dvc push" in err, err
    assert len(runs(client)) == before, "no MLflow run opened"
    assert not [run for run in runs(client) if run.info.status == "RUNNING"]
    assert checkouts(project) == [f"worktree {project}"]


def cache_objects(project: Path, version: str) -> list[Path]:
    """The DVC cache files of a directory version: its listing and every file in it."""
    md5 = project / ".dvc" / "cache" / "files" / "md5"
    listing = md5 / version[:2] / version[2:]
    files = [entry["md5"] for entry in json.loads(listing.read_text())]
    return [listing, *(md5 / name[:2] / name[2:] for name in files)]


@pytest.mark.slow
def test_a_data_version_missing_from_the_cache_is_pulled_from_the_remote(client, project, tmp_path):
    version = client.get_model_version(MODEL, "1").tags["data_version"]
    commit = client.get_model_version(MODEL, "1").tags["git_commit"]
    remote = tmp_path / "remote"
    dvc(project, "remote", "modify", "--local", "storage", "url", str(remote))
    kept = {path: path.read_bytes() for path in cache_objects(project, version)}
    try:
        dvc(project, "push", "data/prepared")
        for path in kept:
            path.unlink()
        with temporary_checkout(project, commit) as checkout:
            how = restore_data(project, checkout, version, f"models:/{MODEL}/1")
            assert dvc_hash(checkout / "data" / "prepared") == version
            assert "dvc.lock" not in git(checkout, "status", "--porcelain")
        assert f"from DVC remote 'storage' ({remote})" in how
        assert all(path.is_file() for path in kept), "pulled into the project's cache"
    finally:
        (project / ".dvc" / "config.local").unlink()
        for path, content in kept.items():
            if not path.is_file():
                path.write_bytes(content)


@pytest.mark.slow
def test_a_version_trained_from_a_dirty_tree_is_rebuilt_with_its_recorded_changes(client, project):
    """Tracked files differ from HEAD when register runs: the version is tagged -dirty, its
    run keeps the diff, and the reproduction applies that diff to the commit."""
    readme = project / "README.md"
    kept = readme.read_text()
    readme.write_text(kept + "\nA local note, not committed.\n")
    env = pipeline_env()
    try:
        registered = subprocess.run(
            # evaluate opens the run (with the test metrics), register joins it
            ["dvc", "repro", "--force", "--single-item", "evaluate", "register"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert registered.returncode == 0, registered.stderr[-3000:]
        listed = client.search_model_versions(f"name = '{MODEL}'")
        version = str(max(int(v.version) for v in listed))
        tags = client.get_model_version(MODEL, version).tags
        assert tags["git_commit"].endswith("-dirty")
        done = subprocess.run(
            module_command("flows.reproduce", f"models:/{MODEL}/{version}"),
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "applied the tracked-file changes" in done.stdout
        assert "result: MATCH" in done.stdout
    finally:
        readme.write_text(kept)
