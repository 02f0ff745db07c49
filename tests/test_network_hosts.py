"""The stack served to a team network, tried from other hosts (README "Team setup").

Three hosts as network namespaces on a private switch (tests/helpers/netns.py): host
``server`` runs `python -m flows.serve --host <its address> --local-s3 --no-worker` in a
git copy of the repository (both servers over HTTPS with the stack's own CA, MLflow's
artifacts in the S3 emulator on the server's loopback, no worker there); host ``b`` is a
training machine with its own clone of the repository, mounted at the path the
deployments were registered from (a mount namespace of its own: the server's project is
not visible there), and the CA file it was given; host ``c`` is a user's shell.

From b: a worker joins with the banner's exports and `prefect worker start`, and trains
the deployment run c triggers; from b: without the CA our entry points stop with one line
naming the fix, without the credential both servers answer 401, a Host header that is not
the served address is refused.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import netns
from tests.helpers.operate import (
    READY_TIMEOUT_S,
    RUN_TIMEOUT_S,
    STOP_TIMEOUT_S,
    deployment_run_args,
    flow_run_id,
)
from tests.helpers.project import TINY

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PREFECT_PORT, MLFLOW_PORT = 4200, 5000  # each host has its own ports: the defaults
NO_EXPORT = ["data", "preprocess", "train", "evaluate", "register"]  # exports: test_export


@pytest.fixture(scope="module")
def hosts():
    reason = netns.unavailable()
    if reason:
        assert not os.environ.get("CI"), f"CI permits network namespaces: {reason}"
        pytest.skip(reason)
    with netns.network("server", "b", "c") as network:
        yield network


@pytest.fixture(scope="module")
def served(hosts, tmp_path_factory):
    """`flows.serve --host <server address>` on host server; yields (project, banner)."""
    from benchmarks.common import copy_repo

    top = tmp_path_factory.mktemp("network")
    project = copy_repo(top / "server-project")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {"PREFECT_HOME": str(top / "server-prefect"), "PATH": f"{BIN}:{env['PATH']}"}
    command = [str(BIN / "python"), "-m", "flows.serve", "--host", hosts.address("server")]
    process = hosts.popen(
        "server",
        [*command, "--local-s3", "--no-worker"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner: list[str] = []
    watchdog = threading.Timer(READY_TIMEOUT_S, process.kill)  # a launcher that hangs
    watchdog.start()
    try:
        for line in process.stdout:
            banner.append(line)
            if "prefect deployment run" in line:
                break
        else:
            raise AssertionError("flows.serve ended:\n" + "".join(banner))
        watchdog.cancel()
        yield project, "".join(banner)
    finally:
        watchdog.cancel()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
    assert process.returncode == 0, "".join(banner)


def client_env(hosts, served, home: Path, *, ca: bool = True, credential: bool = True) -> dict:
    """Host b's shell after the banner's export lines, with the CA file copied over."""
    project, banner = served
    exports = dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"export (.*)", banner))))
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {"PREFECT_HOME": str(home / "prefect"), "PATH": f"{BIN}:{env['PATH']}"}
    env |= {key: exports[key] for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    if credential:
        line = (project / ".pipeline" / "secrets" / "api-credential").read_text().strip()
        user, password = line.split(":", 1)
        env |= {
            "PREFECT_API_AUTH_STRING": line,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
        }
    if ca:
        copied = home / "stack-ca.pem"  # what the banner says to copy to other hosts
        shutil.copy(project / ".pipeline" / "secrets" / "tls" / "ca.pem", copied)
        trusted = [key for key, value in exports.items() if value.endswith("trust.pem")]
        assert sorted(trusted) == sorted(
            [
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "PREFECT_API_SSL_CERT_FILE",
                "MLFLOW_TRACKING_SERVER_CERT_PATH",
            ]
        ), banner
        env |= dict.fromkeys(trusted, str(copied))
    return env


def test_the_banner_serves_https_on_the_address_and_names_the_ca(hosts, served):
    _, banner = served
    address = hosts.address("server")
    assert f"Prefect API  https://{address}:{PREFECT_PORT}/api" in banner, banner
    assert f"MLFLOW_TRACKING_URI=https://{address}:{MLFLOW_PORT}" in banner, banner
    assert "clients on other hosts: copy" in banner and "ca.pem" in banner, banner


def test_without_the_ca_our_commands_stop_with_one_line_naming_the_fix(hosts, served, tmp_path):
    env = client_env(hosts, served, tmp_path, ca=False)
    project, _ = served
    clone = tmp_path / "clone"  # host b's own clone of the repository
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    done = hosts.run(
        "b",
        [str(BIN / "python"), "-m", "flows.reproduce", "models:/any-model/1"],
        env=env,
        cwd=clone,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert "presents a TLS certificate this machine does not trust" in line, line
    assert "ca.pem" in line and "MLFLOW_TRACKING_SERVER_CERT_PATH" in line, line


def _get(hosts, url: str, env: dict, headers: dict[str, str]) -> int:
    """The HTTP status host b gets for GET ``url`` (httpx, trusting the copied CA)."""
    program = (
        "import json, sys, httpx\n"
        "r = httpx.get(sys.argv[1], headers=json.loads(sys.argv[2]), verify=sys.argv[3])\n"
        "print(r.status_code)\n"
    )
    argv = [str(BIN / "python"), "-c", program, url, json.dumps(headers), env["SSL_CERT_FILE"]]
    done = hosts.run("b", argv, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip())


def test_without_the_credential_both_servers_answer_401_and_guard_the_host(hosts, served, tmp_path):
    env = client_env(hosts, served, tmp_path, credential=False)
    address = hosts.address("server")
    prefect = f"https://{address}:{PREFECT_PORT}/api/work_pools/local-process"
    mlflow = f"https://{address}:{MLFLOW_PORT}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(hosts, prefect, env, {}) == 401
    assert _get(hosts, mlflow, env, {}) == 401
    project, _ = served
    line = (project / ".pipeline" / "secrets" / "api-credential").read_text().strip()
    auth = {"Authorization": "Basic " + base64.b64encode(line.encode()).decode()}
    assert _get(hosts, prefect, env, auth) == 200
    assert _get(hosts, mlflow, env, auth) == 200
    # MLflow's Host-header guard follows the served address: another name is refused.
    assert _get(hosts, mlflow, env, auth | {"Host": f"attacker.example:{MLFLOW_PORT}"}) in (
        400,
        403,
    )


def test_a_worker_on_another_host_trains_a_deployment_run_triggered_from_a_third(
    hosts, served, tmp_path
):
    project, banner = served
    assert "none here (--no-worker)" in banner, banner
    clone = tmp_path / "b-clone"  # host b's own copy of the repository
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    b_home, c_home = tmp_path / "b-home", tmp_path / "c-home"
    b_home.mkdir()
    c_home.mkdir()
    # The README's join command on b: the banner's exports, then the worker. Flow runs
    # start in the directory the deployments were registered from: b's clone is mounted
    # there, in b's own mount namespace.
    join = (
        f"mount --bind {shlex.quote(str(clone))} {shlex.quote(str(project))} && exec "
        f"{shlex.quote(str(BIN / 'prefect'))} worker start --pool local-process --type process "
        "--name host-b --limit 1"
    )
    log = b_home / "worker.log"
    with log.open("w") as output:
        worker = hosts.popen(
            "b",
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", join],
            env=client_env(hosts, served, b_home),
            cwd=b_home,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        name = "network-b"
        overrides = TINY | {"mlflow.experiment": name, "register.model_name": name}
        run = hosts.run(
            "c",
            [str(BIN / "prefect"), *deployment_run_args("training-pipeline/train",
                                                        {"overrides": overrides,
                                                         "stages": NO_EXPORT})],
            env=client_env(hosts, served, c_home),
            cwd=c_home,
            timeout=RUN_TIMEOUT_S + 60,
        )  # fmt: skip
        said = " ".join(run.stdout.split())
        assert run.returncode == 0, said[-3000:] + run.stderr[-3000:] + log.read_text()[-3000:]
        assert f"registered {name} version 1" in said, said[-3000:]
        flow_run = flow_run_id(run.stdout)
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
    assert flow_run in log.read_text(), "host b's worker ran it"
    # Its outputs are on b's disk, in its run directory; none on the server's.
    assert (clone / "runs" / flow_run / "reports" / "registration.json").is_file()
    assert not (project / "runs" / flow_run).exists()
    assert [p.name for p in (clone / "mlruns").iterdir()] == [".gitkeep"], "no local store"

    import mlflow

    store = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"  # the server's, read directly
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias(name, "champion")
    assert str(version.version) == "1"
    tags = client.get_run(version.run_id).data.tags
    assert tags["registry.lock"] == f"prefect: registry-{name}", "taken from b, on the server"
    assert tags["pipeline.workdir"] == str(project / "runs" / flow_run)  # b's clone, mounted
    # The model is in the bucket (through the MLflow server: b holds no bucket credential).
    keys = bucket_keys(hosts, project)
    assert any(f"/{version.run_id}/artifacts/evaluate/" in key for key in keys), keys[:20]
    models = [key for key in keys if key.endswith("/MLmodel")]  # MLflow 3: mlflow/<exp>/models/
    (model_id,) = re.findall(r"m-[0-9a-f]{32}", version.source)  # its logged model
    assert any(f"/models/{model_id}/" in key for key in models), (version.source, models)


def bucket_keys(hosts, project: Path) -> list[str]:
    """The S3 emulator's keys, listed on the server host with the stack's credential."""
    program = (
        "import boto3, os\n"
        "s3 = boto3.client('s3', endpoint_url=os.environ['MLFLOW_S3_ENDPOINT_URL'])\n"
        "pages = s3.get_paginator('list_objects_v2').paginate(Bucket='pipeline')\n"
        "print('\\n'.join(o['Key'] for p in pages for o in p.get('Contents', [])))\n"
    )
    env = dict(os.environ)
    for line in (project / ".pipeline" / "secrets" / "s3.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() and not key.startswith("#"):
            env[key.strip()] = value.strip().strip("'\"")
    done = hosts.run("server", [str(BIN / "python"), "-c", program], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()
