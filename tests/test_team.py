"""The README's "Team setup" against real servers on loopback.

The session's stack (tests/fixtures/servers.py `stack`) runs on PostgreSQL (the `team_postgres`
fixture: the machine's own binaries, a temp cluster, password login), keeps MLflow's
artifacts in an S3 bucket (`s3_store`: moto's emulator, generated credential), and has two
workers, the second started as on another machine. These tests check what lands where,
that a PostgreSQL restart under a training run loses and duplicates nothing, and that
promotions from two machines are serialized by the registry lock.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from tests.helpers.operate import BIN, RUN_TIMEOUT_S, deployment_run_args, flow_run_id
from tests.helpers.project import TINY, module_command

pytestmark = pytest.mark.slow
MLFLOW_DB, PREFECT_DB = "pipeline_mlflow", "pipeline_prefect"
EPOCHS = 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _default_tracking_uri():
    """Tests here point this process's MLflow at the team's stores; never leave it there."""
    yield
    mlflow.set_tracking_uri(None)


def metric_steps(team_postgres, experiment: str, key: str) -> list[int]:
    """Every stored value of ``key`` (one row per logged value) of the experiment's runs."""
    rows = team_postgres.query(
        MLFLOW_DB,
        "SELECT m.step FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
        "JOIN experiments e ON r.experiment_id = e.experiment_id "
        "WHERE e.name = %s AND m.key = %s ORDER BY m.step",
        experiment,
        key,
    )
    return [step for (step,) in rows]


@pytest.fixture(scope="module")
def restarted_run(stack, team_postgres):
    """A deployment run whose PostgreSQL crashes (kill -9 of the postmaster) as soon as its
    first epoch's metrics are stored; the stack's supervisor starts it again."""
    name = "team-restart"
    overrides = TINY | {
        "mlflow.experiment": name,
        "register.model_name": name,
        "train.epochs": EPOCHS,
        "data.synthetic.train_size": 3000,  # epochs of a few seconds: the restart lands mid-run
    }
    command = [
        str(BIN / "prefect"),
        *deployment_run_args("training-pipeline/train", {"overrides": overrides}),
    ]
    process = subprocess.Popen(
        command,
        cwd=stack.root,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not metric_steps(team_postgres, name, "loss"):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no epoch metric reached PostgreSQL"
        time.sleep(0.2)
    killed = team_postgres.kill()
    while "PostgreSQL is back" not in "".join(stack.output):
        assert stack.process.poll() is None, stack.logs()
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.2)
    assert team_postgres.postmaster() != killed
    restarted_at_step = max(metric_steps(team_postgres, name, "loss"))
    output = process.communicate(timeout=RUN_TIMEOUT_S)[0]
    assert process.returncode == 0, output[-4000:]
    assert "Flow run finished successfully in 'Completed'" in output, output[-4000:]
    return name, flow_run_id(output), restarted_at_step


def test_a_killed_postgres_is_restarted_by_the_stack_and_said_so(restarted_run, stack):
    said = "".join(stack.output)
    assert "PostgreSQL stopped unexpectedly (killed by SIGKILL); restart 1" in said, said
    log = (stack.root / ".pipeline" / "serve" / "postgres.log").read_text()
    assert "--- flows.serve: stopped unexpectedly (killed by SIGKILL); restart 1" in log


def test_a_postgres_crash_mid_training_loses_and_duplicates_no_epoch(restarted_run, team_postgres):
    name, _, restarted_at_step = restarted_run
    assert restarted_at_step < EPOCHS - 1, "the restart came after the last epoch"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert metric_steps(team_postgres, name, key) == list(range(EPOCHS)), key
    [(status,)] = team_postgres.query(
        MLFLOW_DB,
        "SELECT r.status FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
        "WHERE e.name = %s",
        name,
    )
    assert status == "FINISHED"


def test_the_run_version_and_aliases_are_in_postgresql_and_the_flow_run_in_prefects(
    restarted_run, team_postgres
):
    name, flow_run, _ = restarted_run
    versions = team_postgres.query(
        MLFLOW_DB, "SELECT version FROM model_versions WHERE name = %s", name
    )
    assert versions == [(1,)]
    aliases = team_postgres.query(
        MLFLOW_DB,
        "SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias",
        name,
    )
    assert aliases == [("challenger", 1), ("champion", 1)]
    tags = dict(  # the registry lock is the run's bookkeeping, not the version's
        team_postgres.query(
            MLFLOW_DB,
            "SELECT t.key, t.value FROM tags t JOIN model_versions v ON t.run_uuid = v.run_id "
            "WHERE v.name = %s",
            name,
        )
    )
    assert tags["registry.lock"] == "prefect: registry-team-restart", tags
    [(state,)] = team_postgres.query(
        PREFECT_DB, "SELECT state_type FROM flow_run WHERE id = %s", flow_run
    )
    assert state == "COMPLETED"


def test_the_model_lands_in_the_bucket_and_loads_from_a_client_without_the_servers_disk(
    restarted_run, stack, s3_store, tmp_path
):
    name = restarted_run[0]
    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)
    version = client.get_model_version_by_alias(name, "champion")
    model_keys = [key for key in s3_store.keys("mlflow/") if key.endswith("/MLmodel")]
    assert any(version.source.rsplit("/", 1)[-1] in key for key in model_keys), (
        version.source,
        model_keys,
    )
    # Another machine: a fresh folder, the client settings the banner gives, no AWS_*.
    env = {k: v for k, v in stack.env.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    script = (
        "import mlflow, numpy as np\n"
        f"model = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        "print('rows', len(model.predict(np.zeros((3, 32, 32, 3), np.float32))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows 3" in done.stdout


@pytest.mark.parametrize("lock", ["prefect", "postgresql"])
def test_promotions_from_two_machines_never_interleave_and_keep_the_best_champion(
    stack, team_postgres, tmp_path, lock
):
    """Two processes (separate temp folders: no file lock in common) each register and
    promote 20 versions against the same registry at once: through the MLflow server with
    the Prefect server's lock, or straight on the PostgreSQL tracking database with its
    advisory lock."""
    from flows.stack.postgres import with_database

    name = f"team-promotions-{lock}"
    if lock == "prefect":
        clients = stack.env
        uri, artifacts = stack.mlflow_uri, None
    else:  # no Prefect API: the database's own lock must hold
        clients = {k: v for k, v in stack.env.items() if not k.startswith("PREFECT_API")}
        uri, artifacts = with_database(team_postgres.url, MLFLOW_DB), tmp_path.as_uri()
    clients = clients | {"MLFLOW_TRACKING_URI": uri}
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment(name, artifact_location=artifacts)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_text("a stand-in model folder", "model/README.txt")
    client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/model"
    machines = []
    for seed in (1, 2):
        folder = tmp_path / f"machine-{seed}"
        folder.mkdir()
        command = [
            sys.executable,
            "-m",
            "tests.helpers.promote_many",
            name,
            source,
            run.info.run_id,
        ]
        command += [str(seed), "20", str(folder / "promotions.json")]
        env = clients | {"TMPDIR": str(folder), "PYTHONPATH": str(REPO)}
        if seed == 2:  # the other machine names the servers differently
            env = {k: v.replace("127.0.0.1", "localhost") for k, v in env.items()}
        machines.append(
            (
                folder,
                subprocess.Popen(command, cwd=folder, env=env, stderr=subprocess.PIPE, text=True),
            )
        )
    for _, process in machines:
        assert process.wait(timeout=RUN_TIMEOUT_S) == 0, process.stderr.read()[-3000:]
    records = [
        r for folder, _ in machines for r in json.loads((folder / "promotions.json").read_text())
    ]
    assert len(records) == 40 and {r["lock"] for r in records} == {lock}
    records.sort(key=lambda r: r["held"][0])
    for before, after in itertools.pairwise(records):
        assert before["held"][1] <= after["held"][0], f"promotions interleaved: {before} {after}"
    # Replayed in lock order, each promotion compared with the champion of the one before.
    champion = None
    for record in records:
        assert record["compared_with"] == (champion and champion["version"]), record
        expected = champion is None or record["accuracy"] > champion["accuracy"]
        assert record["promoted"] == expected, record
        if expected:
            champion = record
    best = max(r["accuracy"] for r in records)
    assert champion["accuracy"] == best
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion["version"]
    newest = max(int(r["version"]) for r in records)
    assert int(client.get_model_version_by_alias(name, "challenger").version) == newest


def test_make_serve_team_starts_its_own_postgres_and_store_and_gives_up_on_a_crash_loop(
    tmp_path,
):
    """`make serve-team` (--local-postgres --local-s3), MLflow alone, one restart allowed:
    the throwaway PostgreSQL and the S3 emulator come up on their ports with private
    credentials, a run's artifact lands in the bucket; PostgreSQL killed once is started
    again and serves the next run; killed again, the stack stops everything with one line
    saying why, and nothing outlives it."""
    import psutil

    from flows.stack.object_store import S3Credentials, list_keys
    from tests.helpers.operate import free_port
    from tests.helpers.team_servers import StackPostgres

    project = Path(tempfile.mkdtemp(prefix="serve-team-"))  # reachable by the postgres account
    project.chmod(0o755)
    shutil.copy(REPO / "params.yaml", project)
    ports = {"mlflow": free_port(), "postgres": free_port(), "s3": free_port()}
    command = module_command("flows.serve", "--mlflow-only", "--local-postgres")
    command += ["--local-s3", "--mlflow-port", str(ports["mlflow"]), "--postgres-restarts", "1"]
    command += ["--postgres-port", str(ports["postgres"]), "--s3-port", str(ports["s3"])]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    launcher = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    family = []
    said = []
    try:
        for line in launcher.stdout:
            said.append(line)
            if "MLflow UI login" in line:
                break
        banner = "".join(said)
        assert "pipeline_mlflow" in banner and "s3://pipeline/mlflow" in banner, banner
        secrets_dir = project / ".pipeline" / "secrets"
        password = (secrets_dir / "postgres-password").read_text().strip()
        assert password not in banner
        for name in ("postgres-password", "s3.env"):
            assert (secrets_dir / name).stat().st_mode & 0o777 == 0o600, name
        user, secret = (secrets_dir / "api-credential").read_text().strip().split(":", 1)
        store = dict(line.split("=", 1) for line in (secrets_dir / "s3.env").read_text().split())
        client_env = {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": secret,
        }

        def log_a_run(name: str) -> None:
            script = (
                f"import mlflow\nwith mlflow.start_run():\n    mlflow.log_text('hi', '{name}')\n"
            )
            done = subprocess.run(
                [sys.executable, "-c", script], env=env | client_env, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr[-3000:]

        log_a_run("note.txt")
        credentials = S3Credentials(store["AWS_ACCESS_KEY_ID"], store["AWS_SECRET_ACCESS_KEY"])
        keys = list_keys(store["AWS_ENDPOINT_URL"], credentials, "pipeline", "mlflow/")
        assert any(key.endswith("/artifacts/note.txt") for key in keys), keys
        family = psutil.Process(launcher.pid).children(recursive=True)
        commands = [" ".join(process.cmdline()) for process in family]
        assert any("postgres -D" in command for command in commands), commands
        assert any("flows.stack.object_store" in command for command in commands), commands
        # Secrets travel in files and environments, never in a process list.
        for hidden in (password, store["AWS_SECRET_ACCESS_KEY"], f"{user}:{secret}"):
            assert not any(hidden in command for command in commands)

        database = StackPostgres.of(project)
        database.kill()
        for line in launcher.stdout:
            said.append(line)
            if "PostgreSQL is back" in line:
                break
        log_a_run("after-restart.txt")  # the MLflow server reconnected to the new postmaster
        family = psutil.Process(launcher.pid).children(recursive=True)
        database.kill()
        said.append(launcher.stdout.read())
        assert launcher.wait(timeout=60) == 1
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=60)
        shutil.rmtree(project, ignore_errors=True)
    said = "".join(said)
    assert "PostgreSQL stopped unexpectedly (killed by SIGKILL); restart 1" in said, said
    assert (
        "error: PostgreSQL stopped unexpectedly (killed by SIGKILL) with its 1 restart(s) spent; "
        "stopping everything" in said
    ), said
    assert "Traceback" not in said, said
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"processes outlived the launcher: {alive}"
    for port in ports.values():
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://pipeline:hunter2@127.0.0.1:{port}/postgres", "could not prepare databases"),
        ("mysql://pipeline:hunter2@127.0.0.1:{port}/postgres", "is not a PostgreSQL URL"),
    ],
)
def test_a_bad_database_url_stops_serve_before_any_server_starts(tmp_path, url, expected):
    from tests.helpers.operate import free_port

    shutil.copy(REPO / "params.yaml", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PIPELINE_DATABASE_URL"] = url.format(port=free_port())  # nothing listens there
    # Free ports: the README's `make serve` (4200, 5000) may be running on the other worker.
    ports = ("--mlflow-port", str(free_port()), "--prefect-port", str(free_port()))
    command = module_command("flows.serve", *ports)
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr and "pipeline:***@127.0.0.1" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / ".pipeline" / "serve" / "mlflow.log").exists(), "nothing started"


def test_mlflows_schema_migration_on_start_is_idempotent(restarted_run, team_postgres):
    """What `flows.serve` runs before the MLflow server starts, again on the stack's live
    database: the schema version and the data stay as they were."""
    from flows.stack.backing import migrate_mlflow
    from flows.stack.postgres import with_database

    def state() -> tuple:
        version = team_postgres.query(MLFLOW_DB, "SELECT version_num FROM alembic_version")
        runs = team_postgres.query(MLFLOW_DB, "SELECT count(*) FROM runs")
        metrics = team_postgres.query(MLFLOW_DB, "SELECT count(*) FROM metrics")
        return version, runs, metrics

    before = state()
    migrate_mlflow(with_database(team_postgres.url, MLFLOW_DB))
    assert state() == before


def test_a_flow_run_whose_heartbeats_stop_is_crashed_by_the_stacks_automation(stack):
    """Prefect's own remedy for zombie flow runs (a host or a stack gone under them), set up
    by flows.serve on every Prefect database it serves: silent for 300 s means Crashed. Its
    firing takes those 300 s, so it is measured by hand (closing note), not waited for here."""
    from flows.serve import UNRESPONSIVE, UNRESPONSIVE_AFTER_S

    command = [str(BIN / "prefect"), "automation", "inspect", UNRESPONSIVE, "--json"]
    wide = stack.env | {"COLUMNS": "100000"}  # Rich wraps the JSON at the terminal's width
    done = subprocess.run(command, cwd=stack.root, env=wide, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    [automation] = json.loads(done.stdout)  # by name: a list, one per start would be a bug
    trigger, [action] = automation["trigger"], automation["actions"]
    assert automation["enabled"] and trigger["posture"] == "Proactive"
    assert trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"} <= set(trigger["expect"])
    assert trigger["within"] == UNRESPONSIVE_AFTER_S and trigger["for_each"]
    assert action["type"] == "change-flow-run-state" and action["state"] == "CRASHED"
