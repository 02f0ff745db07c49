"""The served stack tested as an attacker would: without the credential, from a foreign
page, through job variables and parameters, with a crafted model file.

The server tests use the session's `make serve` stack (tests/fixtures/servers.py `stack`,
shared with tests/test_operate.py); the rest run without servers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flows.common import patient_ephemeral_server
from flows.serve import lock_work_pool
from flows.stack import security
from tasks.config import ConfigError, load_config
from tasks.errors import ModelFileError
from tests.helpers.operate import RUN_TIMEOUT_S, deployment_run_args, flow_run_id
from tests.helpers.project import PARAMS, REPO, module_command, tiny_overrides

PIPELINE = "training-pipeline/train"
EVIL = "http://evil.example"


def plain_http() -> httpx.Client:
    """A client with no credential and no CSRF token: what a stranger or a web page has."""
    return httpx.Client(timeout=30, trust_env=False)


# --- credential ----------------------------------------------------------------------


def test_the_first_start_generates_a_private_credential_and_reuses_it(tmp_path):
    path, value = security.ensure_credential(tmp_path, {})
    assert path == tmp_path / security.CREDENTIAL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    user, password = security.split_credential(value)
    assert user == security.DEFAULT_USER and len(password) >= security.MIN_PASSWORD_CHARS
    assert path.read_text().strip() == value
    assert security.ensure_credential(tmp_path, {}) == (path, value), "reused, not regenerated"
    path.chmod(0o644)  # someone loosened it: it is closed again before use
    security.ensure_credential(tmp_path, {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_credential_from_the_environment_wins_and_bad_ones_are_refused(tmp_path):
    security.ensure_credential(tmp_path, {})
    mine = "alice:" + "x" * 20
    path, value = security.ensure_credential(tmp_path, {security.USER_CREDENTIAL_ENV: mine})
    assert value == mine and path.read_text().strip() == mine
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for bad in ("no-colon-here-at-all", ":" + "x" * 20, "bob:short"):
        with pytest.raises(security.CredentialError, match=security.USER_CREDENTIAL_ENV):
            security.ensure_credential(tmp_path, {security.USER_CREDENTIAL_ENV: bad})


def test_a_bad_credential_stops_serve_before_anything_starts(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent), security.USER_CREDENTIAL_ENV: "short"}
    done = subprocess.run(
        module_command("flows.serve", "--prefect-port", "1", "--mlflow-port", "2"),
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert security.USER_CREDENTIAL_ENV in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / ".pipeline" / "serve").exists(), "nothing started"


# --- job variables and deployment inputs (no server) ---------------------------------


def test_the_worker_ignores_job_variables_even_if_the_server_let_them_through():
    """Defense in depth: the locked template has no placeholder a variable could fill."""
    from prefect.workers.process import ProcessJobConfiguration

    injected = {"command": "touch /tmp/pwned", "env": {"LD_PRELOAD": "/tmp/x.so"}}
    injected |= {"working_dir": "/tmp", "env.PYTHONSTARTUP": "/tmp/x.py"}
    # Its client starts Prefect's temporary server here, which gave up after its default
    # 20 s once under load (a run with three test processes).
    with patient_ephemeral_server():
        config = asyncio.run(
            ProcessJobConfiguration.from_template_and_values(security.LOCKED_JOB_TEMPLATE, injected)
        )
    assert config.command is None  # the worker builds its own `python -m prefect.engine`
    assert config.working_dir is None
    assert "LD_PRELOAD" not in config.env and "PYTHONSTARTUP" not in config.env


@pytest.mark.parametrize(
    ("workdir", "files", "message"),
    [
        ("/tmp/elsewhere", {}, "workdir"),
        ("runs", {}, "workdir"),  # runs/ itself holds every run: not a run directory
        ("runs/../data", {}, "workdir"),
        ("runs/abc", {"params_path": "/etc/passwd"}, "params_path"),
        ("runs/abc", {"profile": "../outside.yaml"}, "profile"),
    ],
)
def test_deployment_runs_read_and_write_only_inside_the_project(tmp_path, workdir, files, message):
    with pytest.raises(ConfigError, match=message):
        security.check_deployment_files(tmp_path, tmp_path / workdir, files)


def test_deployment_run_paths_inside_the_project_are_accepted(tmp_path):
    files = {"params_path": "params.yaml", "profile": "profiles/fast_fashion_mnist.yaml"}
    security.check_deployment_files(tmp_path, tmp_path / "runs" / "abc", files)


@pytest.mark.parametrize(
    ("override", "tracking_env", "refused"),
    [
        ({"data.tfds_dir": "/tmp/tfds"}, None, "data.tfds_dir"),
        ({"mlflow.artifact_root": "/var/tmp/artifacts"}, None, "mlflow.artifact_root"),
        ({"mlflow.tracking_uri": "sqlite:////tmp/other.db"}, None, "mlflow.tracking_uri"),
        # The worker's MLFLOW_TRACKING_URI wins over the config: nothing is written there.
        ({"mlflow.tracking_uri": "sqlite:////tmp/other.db"}, "http://127.0.0.1:5000", None),
        ({"data.idx_dir": "/etc"}, None, None),  # reading from anywhere is fine
        ({}, None, None),
    ],
)
def test_deployment_runs_write_to_stores_inside_the_project(override, tracking_env, refused):
    project = REPO
    cfg = load_config(PARAMS, override)
    check = security.check_deployment_stores
    if refused is None:
        check(project, project / "runs" / "abc", cfg, tracking_env)
    else:
        with pytest.raises(ConfigError, match=refused):
            check(project, project / "runs" / "abc", cfg, tracking_env)


def test_a_model_name_cannot_smuggle_a_search_filter():
    with pytest.raises(ConfigError, match="register.model_name"):
        load_config(PARAMS, {"register.model_name": "x' OR name LIKE '%"})


# --- crafted model file --------------------------------------------------------------


@pytest.fixture(scope="module")
def crafted_model_project(tmp_path_factory):
    """A project whose data and stats are real and whose model.keras carries a Lambda."""
    import keras

    from benchmarks.common import set_params
    from tasks import prepared
    from tasks.stages import data as data_stage
    from tasks.stages import preprocess as preprocess_stage
    from tasks.workspace import Workspace, write_json

    root = tmp_path_factory.mktemp("crafted")
    (root / "params.yaml").write_text(PARAMS.read_text())
    set_params(root, tiny_overrides(root))
    cfg = load_config(root / "params.yaml")
    ws = Workspace(root)
    data_stage.run(cfg, ws)
    preprocess_stage.run(cfg, ws)
    inputs = keras.Input(tuple(prepared.load_meta(ws.prepared)["image_shape"]))
    code = keras.layers.Lambda(lambda x: x * 2.0)(inputs)  # any Python would do
    logits = keras.layers.Dense(10)(keras.layers.Flatten()(code))
    ws.model_file.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, logits).save(ws.model_file)
    write_json(ws.metrics, {"test": {"accuracy": 0.5}})  # the register stage's input
    return root, cfg, ws


@pytest.mark.parametrize("stage", ["evaluate", "register"])
def test_a_model_file_carrying_code_is_refused_by_the_stages(crafted_model_project, stage):
    root, cfg, ws = crafted_model_project
    done = subprocess.run(
        module_command("flows.stage", stage),
        cwd=root,
        env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error in stage")]
    assert str(ws.model_file) in line and "executable code" in line and "safe_mode" in line
    if stage == "register":
        import mlflow

        client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
        assert client.search_model_versions(f"name = '{cfg.register.model_name}'") == []


def test_load_model_file_names_a_corrupt_file(tmp_path):
    from tasks.models.files import load_model_file

    path = tmp_path / "model.keras"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFileError, match=r"model.keras is not a .keras archive"):
        load_model_file(path)


# --- the served stack ----------------------------------------------------------------


@pytest.mark.slow
def test_the_prefect_api_refuses_requests_without_the_credential(stack):
    api = stack.prefect_api
    deployment = stack.api(f"deployments/name/{PIPELINE}")
    create = f"{api}/deployments/{deployment['id']}/create_flow_run"
    with plain_http() as http:
        # The reproduction, step by step: foreign Host, foreign Origin, no credential.
        foreign = {"Host": "evil.example", "Origin": EVIL}
        assert http.get(f"{api}/deployments/name/{PIPELINE}", headers=foreign).status_code == 401
        body = {"job_variables": {"command": "touch /tmp/pwned"}}
        refused = http.post(create, json=body, headers=foreign)
        assert refused.status_code in (401, 403), refused.text  # 403: CSRF check comes first
        forged = {"Prefect-Csrf-Token": "x", "Prefect-Csrf-Client": "y"}
        assert http.post(create, json={}, headers=forged).status_code == 403
        # Even a real CSRF token (one needs the credential to get it) is not enough.
        with stack.http() as authorized:
            csrf = {k: authorized.headers[k] for k in ("Prefect-Csrf-Token", "Prefect-Csrf-Client")}
        assert http.post(create, json={}, headers=csrf).status_code == 401
        wrong = httpx.BasicAuth("pipeline", "not-the-password-at-all")
        assert http.post(f"{api}/flow_runs/filter", json={}, auth=wrong).status_code in (401, 403)
        assert http.get(f"{api}/work_pools/local-process", auth=wrong).status_code == 401
        # Prefect keeps /health open for probes; it says nothing but "true".
        health = http.get(f"{api}/health")
        assert health.status_code == 200 and health.json() is True
    assert stack.api(f"deployments/name/{PIPELINE}")["id"] == deployment["id"]


@pytest.mark.slow
def test_job_variables_cannot_change_what_the_worker_runs(stack, tmp_path):
    marker = tmp_path / "pwned"
    deployment = stack.api(f"deployments/name/{PIPELINE}")
    pool = stack.api("work_pools/local-process")
    assert pool["base_job_template"] == security.LOCKED_JOB_TEMPLATE
    before = len(stack.api_flow_runs())
    with stack.http() as client:  # valid credential and CSRF token
        for variables in (
            {"command": f"touch {marker}"},
            {"env": {"PYTHONSTARTUP": str(marker)}},
            {"working_dir": str(tmp_path)},
            {"stream_output": False},
        ):
            answer = client.post(
                f"/deployments/{deployment['id']}/create_flow_run",
                json={"job_variables": variables},
            )
            assert answer.status_code == 422, answer.text
            assert "Additional properties are not allowed" in answer.text
    assert len(stack.api_flow_runs()) == before, "no flow run was created"
    assert not marker.exists()


@pytest.mark.slow
def test_serve_relocks_a_work_pool_that_was_opened(stack):
    """A pool created by an older launcher (Prefect's default template, with `command`)."""
    from prefect.workers.process import ProcessWorker

    open_template = ProcessWorker.get_default_base_job_template()
    with stack.http() as client:
        client.patch("/work_pools/local-process", json={"base_job_template": open_template})
    assert (
        "command"
        in stack.api("work_pools/local-process")["base_job_template"]["variables"]["properties"]
    )
    lock_work_pool("local-process", stack.env, stack.root)
    assert stack.api("work_pools/local-process")["base_job_template"] == (
        security.LOCKED_JOB_TEMPLATE
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"workdir": "/tmp/elsewhere"}, "workdir"),
        ({"params_path": "/etc/passwd"}, "params_path"),
        ({"overrides": {"data.tfds_dir": "/tmp/tfds-elsewhere"}}, "data.tfds_dir"),
        ({"parent_run_id": "../../etc"}, "parent_run_id"),
    ],
)
def test_a_deployment_run_cannot_read_or_write_outside_the_project(stack, parameters, message):
    result = stack.prefect(*deployment_run_args(PIPELINE, parameters), timeout=RUN_TIMEOUT_S)
    assert result.returncode != 0
    state = stack.flow_run(flow_run_id(result.stdout))["state"]
    assert state["type"] == "FAILED" and message in state["message"], state
    assert "root:" not in state["message"], "no file content in the message"
    assert not Path("/tmp/elsewhere").exists() and not Path("/tmp/tfds-elsewhere").exists()


@pytest.mark.slow
def test_browsers_from_other_origins_get_nothing(stack):
    prefect_origin = stack.prefect_api.removesuffix("/api")
    preflight = {"Access-Control-Request-Method": "POST"}
    with plain_http() as http:
        foreign = http.options(
            f"{stack.prefect_api}/flow_runs/filter", headers=preflight | {"Origin": EVIL}
        )
        assert "access-control-allow-origin" not in foreign.headers
        own = http.options(
            f"{stack.prefect_api}/flow_runs/filter",
            headers=preflight | {"Origin": prefect_origin},
        )
        assert own.headers.get("access-control-allow-origin") == prefect_origin
        # MLflow: its own Host guard, and CORS for its own origin only.
        search = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        auth = security.split_credential(stack.credential)
        assert http.get(search, headers={"Host": "evil.example"}, auth=auth).status_code == 403
        foreign = http.options(search, headers=preflight | {"Origin": EVIL})
        assert "access-control-allow-origin" not in foreign.headers


@pytest.mark.slow
def test_the_mlflow_server_requires_the_credential(stack):
    search = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = security.split_credential(stack.credential)
    with plain_http() as http:
        assert http.get(search).status_code == 401
        assert http.get(search, auth=(user, "wrong-password-123456")).status_code == 401
        assert http.get(search, auth=(user, password)).status_code == 200


@pytest.mark.slow
def test_the_credential_file_is_private_and_never_logged(stack):
    path = stack.root / security.CREDENTIAL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == stack.credential
    _, password = security.split_credential(stack.credential)
    assert password not in "".join(stack.output), "the banner shows the file, not the secret"
    for log in (stack.root / ".pipeline" / "serve").glob("*.log"):
        assert password not in log.read_text(errors="replace"), log
    # Every Prefect artifact and log line of the session's flow runs (test_operate's too).
    assert password not in json.dumps(stack.api_post("artifacts/filter", {}))
    offset = 0
    while logs := stack.api_post("logs/filter", {"limit": 200, "offset": offset}):
        assert password not in json.dumps(logs)
        offset += len(logs)
    assert offset > 0, "the flow runs' logs were read"
    tracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"],
        cwd=stack.root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ".pipeline" not in tracked, "the credential cannot be committed by accident"


@pytest.mark.slow
def test_make_ui_serves_mlflow_alone_behind_the_same_credential(tmp_path):
    from tests.helpers.operate import free_port

    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    port = free_port()
    process = subprocess.Popen(
        module_command("flows.serve", "--mlflow-only", "--mlflow-port", str(port)),
        cwd=tmp_path,
        env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = process.stdout.readline() + process.stdout.readline()
        assert "Serving the MLflow UI" in banner, banner + process.stdout.read()
        credential = (tmp_path / security.CREDENTIAL_FILE).read_text().strip()
        assert credential not in banner
        with plain_http() as http:
            url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
            assert http.get(url).status_code == 401
            assert http.get(url, auth=security.split_credential(credential)).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0
