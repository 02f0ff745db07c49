"""The stack served to a team network, tried from another host (README "Team setup").

Two hosts as network namespaces on a private switch (tests/helpers/netns.py): host
``server`` runs `python -m flows.serve --host <its address>` in a git copy of the
repository, which serves both servers over HTTPS with the stack's own CA; host ``b`` is
another machine with nothing of the server's disk but the CA file it was given. From b:
the banner's exports (credential, CA) reach both servers; without the CA our entry points
stop with one line naming the fix; without the credential both servers answer 401; a
Host header that is not the served address is refused.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import netns
from tests.helpers.operate import READY_TIMEOUT_S, STOP_TIMEOUT_S

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PREFECT_PORT, MLFLOW_PORT = 4200, 5000  # each host has its own ports: the defaults


@pytest.fixture(scope="module")
def hosts():
    reason = netns.unavailable()
    if reason:
        assert not os.environ.get("CI"), f"CI permits network namespaces: {reason}"
        pytest.skip(reason)
    with netns.network("server", "b") as network:
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
        [*command, "--no-deploy"],
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


def test_another_host_with_the_ca_and_credential_reaches_both_servers(hosts, served, tmp_path):
    env = client_env(hosts, served, tmp_path)
    pools = hosts.run("b", [str(BIN / "prefect"), "work-pool", "ls"], env=env, cwd=tmp_path)
    assert pools.returncode == 0, pools.stdout + pools.stderr
    assert "local-proc" in pools.stdout, pools.stdout
    listed = hosts.run(
        "b",
        [
            str(BIN / "python"),
            "-c",
            "import mlflow; print([e.name for e in mlflow.MlflowClient().search_experiments()])",
        ],
        env=env,
        cwd=tmp_path,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "Default" in listed.stdout


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
