"""Rebuild a registered version with one command (flows/reproduce/), from another clone.

End to end, on the real Fashion-MNIST IDX files (three classes, a few labels each): clone
A, a git copy of the repository, registers a version by each way of training it (`dvc
repro`, `python -m flows.pipeline`, the nightly retrain flow, `dvc exp run --temp`), with an
MLflow store and a DVC remote (the project's default, a folder beside the clones) that
clone B shares. Then the IDX files are deleted and `python -m flows.reproduce` rebuilds
the versions in clone B, a fresh `git clone` of A with an empty DVC cache: MATCH. The
nightly retrain's version is not rebuilt a second time: it records the dvc repro version's
data version and params and trained to the same metrics, so its rebuild is that one's;
clone B is checked to hold its commit and data. Versions from deployment runs and a
sweep's winner, and the reproduce deployment, are tested on the team stack
(tests/test_operate.py). The rule, the URI gate and the tag checks are also tested alone,
without the pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.common import copy_repo, set_params
from flows.common import locked_data_version
from flows.reproduce.checkout import with_data_version
from flows.reproduce.rules import (
    CROSS_DEVICE_TOLERANCE,
    REPRODUCES_TAG,
    Rebuilt,
    Row,
    Rule,
    VersionRecord,
    choose_rule,
    compare,
    matches,
    parse_model_uri,
    verdict,
)
from flows.reproduce.runner import check_rebuildable, main, reproduce
from tasks.errors import ReproduceError
from tests.helpers.project import (
    FASHION,
    REAL_FASHION,
    REPO,
    TINY,
    call_main,
    dvc_repro,
    module_command,
    pipeline_env,
)

MODEL = "fashion_mnist-classes-0-1-2-seed_cnn"  # register.model_name: auto, on REAL_FASHION data
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
    # oneDNN's CPU kernels round differently from Eigen's: exact only with the same setting.
    off = VersionRecord.from_tags(MODEL, "1", recorded | {"onednn": "false"})
    assert off.onednn is False and original.onednn is None
    assert choose_rule(off, Rebuilt(True, SAME_LIBRARIES, onednn=False), 1e-6).exact
    switched = choose_rule(off, Rebuilt(True, SAME_LIBRARIES, onednn=True), 1e-6)
    assert not switched.exact and "oneDNN's CPU kernels were off, now on" in switched.reason


def test_the_rebuild_runs_with_onednn_as_the_version_recorded_it(monkeypatch):
    from flows.reproduce.runner import child_env

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "not-this-one")
    versions = {"tensorflow": "2.21.0", "keras": "3.15.1"}
    recorded = TAGS | {"deterministic": "true", "versions": json.dumps(versions)}
    for tag, want in [("true", "1"), ("false", "0")]:
        env = child_env(
            "sqlite:///x.db", VersionRecord.from_tags(MODEL, "1", recorded | {"onednn": tag})
        )
        assert env["TF_ENABLE_ONEDNN_OPTS"] == want and "PREFECT__FLOW_RUN_ID" not in env
        assert env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    # Recorded beats what the caller set: the comparison is exact only with the same kernels.
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    env = child_env(
        "sqlite:///x.db", VersionRecord.from_tags(MODEL, "1", recorded | {"onednn": "false"})
    )
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "0"
    # Not recorded (registered before it was): that commit's code and TensorFlow decide,
    # unless the caller set it.
    untagged = VersionRecord.from_tags(MODEL, "1", recorded)
    assert child_env("sqlite:///x.db", untagged)["TF_ENABLE_ONEDNN_OPTS"] == "1"
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    assert "TF_ENABLE_ONEDNN_OPTS" not in child_env("sqlite:///x.db", untagged)


def test_a_gpu_version_rebuilt_on_a_cpu_is_judged_by_the_stated_cross_device_tolerance():
    versions = {"tensorflow": "2.21.0", "keras": "3.15.1"}
    tags = TAGS | {"deterministic": "true", "versions": json.dumps(versions)}
    on_gpu = VersionRecord.from_tags(MODEL, "1", tags | {"device": "NVIDIA H100 80GB HBM3"})
    cpu = Rebuilt(True, SAME_LIBRARIES, device="CPU: AMD EPYC (2 cores)")
    rule = choose_rule(on_gpu, cpu, 1e-6)
    assert (rule.exact, rule.cross_device, rule.tolerance) == (False, True, CROSS_DEVICE_TOLERANCE)
    assert "NVIDIA H100 80GB HBM3" in rule.reason and "CPU: AMD EPYC" in rule.reason
    assert "not an exact reproduction" in rule.describe()
    rows = compare({"test/accuracy": 0.90}, {"test/accuracy": 0.91})
    assert verdict(rows, rule).startswith("MATCH within the cross-device tolerance")
    assert not matches(compare({"test/accuracy": 0.90}, {"test/accuracy": 0.95}), rule)
    assert choose_rule(on_gpu, cpu, 1e-6, cross_device_tolerance=0.05).tolerance == 0.05
    # Same kind of device on both sides (or one not recorded): the usual rules.
    on_cpu = VersionRecord.from_tags(MODEL, "1", tags | {"device": "CPU: other (8 cores)"})
    assert choose_rule(on_cpu, cpu, 1e-6).exact
    assert choose_rule(VersionRecord.from_tags(MODEL, "1", tags), cpu, 1e-6).exact


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


# --- end to end: every origin, registered in clone A, rebuilt in clone B ----------------

needs_fashion = pytest.mark.skipif(
    not FASHION.is_dir() and not os.environ.get("CI"),
    reason="apt-get install dataset-fashion-mnist (.ci/run installs it; CI never skips)",
)


def git(root: Path, *args: str) -> str:
    ident = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    done = subprocess.run(["git", *ident, *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run(module_command("dvc", *args), cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_ok(command: list[str], cwd: Path) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=pipeline_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def top(tmp_path_factory) -> Path:
    """The folder both clones live in: the IDX files they train on (a copy, deleted before
    the rebuilds), the shared MLflow store, and the project's default DVC remote
    (`../../gpu-train-pipeline-dvc-storage` from each clone's .dvc/: this folder)."""
    top = tmp_path_factory.mktemp("clones")
    if FASHION.is_dir():
        shutil.copytree(FASHION, top / "fashion-idx")
    return top


@pytest.fixture(scope="module")
def project(top) -> Path:
    """Clone A: a git copy of the repository, params committed (so its versions' commits
    are clean and clone B has them), version 1 registered by the real `dvc repro`, whose
    dvc.lock is committed then."""
    if not (top / "fashion-idx").is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist (.ci/run installs it)")
    root = copy_repo(top / "a")
    store = top / "mlflow"
    set_params(
        root,
        TINY
        | REAL_FASHION
        | {
            "data.idx_dir": str(top / "fashion-idx"),
            "mlflow.tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
            "mlflow.artifact_root": str(store / "artifacts"),
        },
    )
    git(root, "commit", "-qam", "tiny params on the real files")
    dvc_repro(root)
    git(root, "commit", "-qm", "dvc.lock: the data version")  # as the README says to
    return root


@pytest.fixture(scope="module")
def client(project, top):
    import mlflow

    uri = f"sqlite:///{top / 'mlflow' / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs(client) -> list:
    experiment = client.get_experiment_by_name(experiment_of_model(client))
    return client.search_runs([experiment.experiment_id])


def experiment_of_model(client) -> str:
    run_id = client.get_model_version(MODEL, "1").run_id
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def latest_version(client) -> str:
    return str(max(int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")))


def version_count(client) -> int:
    return len(client.search_model_versions(f"name = '{MODEL}'"))


def checkouts(root: Path) -> list[str]:
    return [
        line
        for line in git(root, "worktree", "list", "--porcelain").splitlines()
        if line.startswith("worktree ")
    ]


RETRAIN = (
    "from flows.common import patient_ephemeral_server\n"
    "from flows.retrain import scheduled_retrain\n"
    "with patient_ephemeral_server():\n"
    "    scheduled_retrain()\n"
)


@pytest.fixture(scope="module")
def origins(project, client) -> dict[str, str]:
    """One registered version per way of training, all in clone A: origin -> version."""
    made = {"dvc repro": "1"}
    stages = ("--stages", "data", "preprocess", "train", "evaluate", "register")  # no export
    run_ok(module_command("flows.pipeline", "train.seed=7", *stages), project)  # runs/<id>/
    made["python -m flows.pipeline"] = latest_version(client)
    # The nightly retrain: dvc.lock's data version (from the cache), in runs/<id>/.
    run_ok([module_command("flows.pipeline")[0], "-c", RETRAIN], project)
    made["nightly retrain"] = latest_version(client)
    # A DVC experiment, in DVC's temporary workspace (.dvc/tmp/exps/<name>/, as `--queue`
    # runs too): params.yaml changed there, so the commit is -dirty and its run records the
    # diff; its data goes to the project's cache and remote, not to a remote taken
    # relative to that workspace. (In the workspace itself, `dvc exp run` registers the
    # way `dvc repro` does, with the same -dirty diff: the README's `dvc exp` block.)
    command = module_command("dvc", "exp", "run", "--temp", "-S", "train.learning_rate=0.003")
    run_ok(command, project)
    made["dvc exp run --temp"] = latest_version(client)
    assert len(set(made.values())) == 4, made
    return made


@pytest.fixture(scope="module")
def clone_b(origins, top) -> Path:
    """Clone B: `git clone` of A beside it (the same default DVC remote), its DVC cache
    empty; and the data source gone (the IDX files deleted)."""
    clone = top / "b"
    git(top, "clone", "-q", str(top / "a"), str(clone))
    assert not (clone / ".dvc" / "cache").exists()
    shutil.rmtree(top / "fashion-idx")
    return clone


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize(
    "origin",
    [
        "dvc repro",
        "python -m flows.pipeline",  # data made and kept from runs/<id>/, a seed override
        "dvc exp run --temp",  # -dirty, its recorded diff applied
    ],
)
def test_a_version_from_every_origin_is_rebuilt_in_another_clone_without_its_source(
    origin, origins, clone_b, client, top
):
    version = origins[origin]
    tags = client.get_model_version(MODEL, version).tags
    # The project's default remote, beside the clones (also from DVC's temporary workspace).
    remote = top / "gpu-train-pipeline-dvc-storage"
    assert tags["data_storage"] == f"DVC remote 'storage' ({remote})", tags["data_storage"]
    before = {run.info.run_id for run in runs(client)}
    versions = version_count(client)
    output = run_ok(module_command("flows.reproduce", f"models:/{MODEL}/{version}"), clone_b)
    assert "result: MATCH" in output, output[-3000:]
    # Each is tagged deterministic with its library versions, same device: the exact rule.
    assert "rule: exact" in output, output[-2000:]
    # Trained and rebuilt with oneDNN's CPU kernels on (the pipeline's default), and said so.
    assert tags["onednn"] == "true", tags
    assert output.count(", oneDNN on") == 2, output[-3000:]
    # Clone B started with an empty cache: the first rebuild pulls the data from the
    # remote, later ones of the same data version find it in B's own cache.
    pulled = "from DVC remote 'storage'" in output
    assert pulled or f"from the DVC cache {clone_b / '.dvc' / 'cache'}" in output, output[-2000:]
    if origin == "dvc repro":
        assert pulled, output[-2000:]
    assert f"preprocess outputs: identical (data/preprocess {tags['preprocess_version']})" in output
    assert version_count(client) == versions, "a reproduction never registers"
    (new,) = [run for run in runs(client) if run.info.run_id not in before]
    assert new.info.status == "FINISHED"
    assert new.data.tags[REPRODUCES_TAG] == f"{MODEL}/{version}"
    assert new.data.tags[f"{REPRODUCES_TAG}.match"] == "true"
    original = client.get_run(tags["run_id"])
    assert new.data.tags["pipeline.git_commit"] == original.data.tags["pipeline.git_commit"]
    for key in COMPARED:
        assert new.data.metrics[key] == original.data.metrics[key], key
    # Per-class F1 is compared from each run's evaluate/per_class.json: the MATCH covers it.
    assert "per_class/f1_Pullover" in output, output[-2000:]
    if origin.startswith("dvc exp run"):
        assert tags["git_commit"].endswith("-dirty")
        assert "applied the tracked-file changes" in output
    assert checkouts(clone_b) == [f"worktree {clone_b}"], "the temporary checkout is gone"
    checkout = next(line for line in output.splitlines() if "rerunning" in line).split()[-1]
    assert not Path(checkout).exists()


@pytest.mark.slow
@needs_fashion
def test_the_nightly_retrain_version_is_the_locked_data_version_retrained_and_rebuildable(
    origins, clone_b, project, client, top
):
    """The retrain (flows.retrain, in runs/<id>/, without the data stage) records what the
    reproduction reads: dvc.lock's data version, the committed params, a clean commit. It
    trained on the same data with the same params and code as the dvc repro version and got
    the same metrics, so rebuilding it is rebuilding that version (MATCH above); clone B
    holds its commit and its data (the remote), so it would be rebuilt, not refused."""
    version = client.get_model_version(MODEL, origins["nightly retrain"])
    repro = client.get_model_version(MODEL, origins["dvc repro"]).tags
    tags = version.tags
    run = client.get_run(tags["run_id"])
    workdir = Path(run.data.tags["pipeline.workdir"])
    assert workdir.parent == project / "runs", workdir
    assert "pipeline.stage.data" not in run.data.tags, "the retrain checks the data out"
    for stage in ("preprocess", "train", "evaluate", "register"):
        assert run.data.tags[f"pipeline.stage.{stage}"] == "done", stage
    assert tags["data_version"] == locked_data_version(project) == repro["data_version"]
    for key in ("preprocess_version", "params", "deterministic", "versions", "device"):
        assert tags[key] == repro[key], key
    assert tags["git_commit"] == git(project, "rev-parse", "HEAD").strip()  # clean
    remote = top / "gpu-train-pipeline-dvc-storage"
    assert tags["data_storage"] == f"DVC remote 'storage' ({remote})", tags["data_storage"]
    original = client.get_run(repro["run_id"])
    for key in COMPARED:
        assert run.data.metrics[key] == original.data.metrics[key], key
    uri = f"sqlite:///{top / 'mlflow' / 'mlflow.db'}"
    record = VersionRecord.from_tags(MODEL, version.version, tags)
    assert check_rebuildable(clone_b, record, uri) is None  # commit known, data on the remote


@pytest.mark.slow
@needs_fashion
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


@pytest.fixture
def cli(project, monkeypatch, capsys):
    """``main(argv)`` in the project, as `python -m flows.reproduce` runs it: (status,
    stdout, stderr). The signal handlers main installs are put back afterwards."""
    monkeypatch.chdir(project)

    def run(*argv: str) -> tuple[int, str, str]:
        return call_main(main, argv, capsys)

    return run


@pytest.fixture(scope="module")
def foreign_versions(project, client) -> dict[str, str]:
    """Versions the pipeline cannot rebuild, registered by hand: name -> version."""
    v1 = client.get_model_version(MODEL, "1")
    source = f"{client.get_run(v1.run_id).info.artifact_uri}/model"
    unknown_commit = v1.tags | {"git_commit": "0123456789abcdef0123456789abcdef01234567"}
    dirty = v1.tags | {"git_commit": f"{v1.tags['git_commit']}-dirty"}
    cache_only = v1.tags | {
        "data_version": "0123456789abcdef0123456789abcdef.dir",
        "data_storage": "DVC cache only (/elsewhere/.dvc/cache): no DVC remote was configured",
    }
    return {
        kind: client.create_model_version(MODEL, source, tags=tags).version
        for kind, tags in [
            ("untagged", {}),
            ("unknown commit", unknown_commit),
            ("dirty", dirty),
            ("cache only", cache_only),
        ]
    }


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("models:/cifar10-cnn/1 && id", "is not a model version URI"),
        ("models:/no-such-model/1", "no registered model 'no-such-model'"),
        (f"models:/{MODEL}/999", f"does not exist: '{MODEL}' has versions 1 to"),
        ("untagged", "registered by something else"),
        ("unknown commit", "which the git repository at"),
        ("dirty", "the difference was never recorded, so git cannot rebuild it"),
        # Never pushed: which hash, where it was looked for, where it was kept, and what
        # would have prevented it.
        (
            "cache only",
            "data version 0123456789abcdef0123456789abcdef.dir of data/prepared",
        ),
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
    if target == "cache only":
        assert "nor on the DVC remote 'storage'" in err, err
        assert "DVC cache only (/elsewhere/.dvc/cache)" in err
        assert "`dvc remote add -d storage <url>`" in err, err
    assert out == "", "refused before any work"
    assert len(runs(client)) == before, "no MLflow run opened"
    assert not [run for run in runs(client) if run.info.status == "RUNNING"]
    assert checkouts(project) == [f"worktree {project}"]


@pytest.mark.slow
@needs_fashion
def test_the_command_line_refuses_with_one_line_and_status_2(project):
    done = subprocess.run(
        module_command("flows.reproduce", f"models:/{MODEL}/999"),
        cwd=project,
        env=pipeline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: models:/{MODEL}/999 does not exist: '{MODEL}' has versions")
