"""The stack served to a team network, tried from other hosts (README "Team setup" and
"Multi-device and multi-machine training").

Three hosts as network namespaces on a private switch (tests/helpers/netns.py): host
``server`` runs `python -m flows.serve --host <its address> --local-postgres --local-s3
--no-worker` in a git copy of the repository (both servers over HTTPS with the stack's own
CA, PostgreSQL behind them on the server's loopback, the S3 emulator on its address, no
worker there); hosts ``b`` and ``c`` are training machines, each with its own clone of the
repository and the CA file it was given.

- Workers join on b and c with the banner's exports and `prefect worker start` (each
  host's clone mounted at the path the deployments were registered from, in a mount
  namespace of its own), and two deployment runs triggered together from c's shell train
  one on each host, registering under the registry lock on the Prefect server.
- Multi-worker training across b (the chief, `dvc repro`) and c (`flows.stage train`), the
  data and the model going between them through the DVC remote (the emulator's bucket):
  c's worker killed mid-run stops b with one line naming it, the rerun resumes, and c
  rebuilds the registered version with `flows.reproduce`.
- From b: without the CA our entry points stop with one line naming the fix, without the
  credential both servers answer 401, a Host header that is not the served address is
  refused.
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
import tempfile
import threading
import time
from pathlib import Path

import pytest

from benchmarks.common import set_params
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
def served(hosts):
    """`flows.serve --host <server address>` on host server; yields (project, banner)."""
    from benchmarks.common import copy_repo

    top = Path(tempfile.mkdtemp(prefix="network-"))  # PostgreSQL's account reaches it
    top.chmod(0o755)
    project = copy_repo(top / "server-project")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {"PREFECT_HOME": str(top / "server-prefect"), "PATH": f"{BIN}:{env['PATH']}"}
    command = [str(BIN / "python"), "-m", "flows.serve", "--host", hosts.address("server")]
    process = hosts.popen(
        "server",
        [*command, "--local-postgres", "--local-s3", "--no-worker"],
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
        stop(process, timeout_s=STOP_TIMEOUT_S)
        shutil.rmtree(top, ignore_errors=True)
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


def clone_on(project: Path, folder: Path) -> Path:
    """A host's own clone of the repository (the team's git server is ``project``)."""
    subprocess.run(["git", "clone", "-q", str(project), str(folder)], check=True)
    return folder


def start_worker(hosts, served, host: str, clone: Path, home: Path) -> subprocess.Popen:
    """The README's join command on ``host``: the banner's exports, then the worker. Flow
    runs start in the directory the deployments were registered from: the host's clone is
    mounted there, in a mount namespace of its own (the server's files are not visible)."""
    project, _ = served
    home.mkdir()
    join = (
        f"mount --bind {shlex.quote(str(clone))} {shlex.quote(str(project))} && exec "
        f"{shlex.quote(str(BIN / 'prefect'))} worker start --pool local-process --type process "
        f"--name host-{host} --limit 1"
    )
    with (home / "worker.log").open("w") as output:
        return hosts.popen(
            host,
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", join],
            # A test's pace: poll for runs every 2 s instead of Prefect's 10.
            env=client_env(hosts, served, home) | {"PREFECT_WORKER_QUERY_SECONDS": "2"},
            cwd=home,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop(*processes: subprocess.Popen, timeout_s: float = 20) -> None:
    """Ctrl-C to each at once; SIGKILL what still runs after ``timeout_s``."""
    for process in processes:
        process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def registry(hosts, env: dict, name: str) -> dict:
    """The registered model ``name`` as a client on host c sees it through the MLflow
    server: versions with their tags, the run tags of each, the aliases, and every run of
    the experiment named ``name`` (id: status, end reason)."""
    program = (
        "import json, sys, mlflow\n"
        "client = mlflow.MlflowClient()\n"
        "name = sys.argv[1]\n"
        "versions = client.search_model_versions(f\"name = '{name}'\")\n"
        "model = client.get_registered_model(name)\n"
        "runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])\n"
        "print(json.dumps({'aliases': model.aliases, 'versions': {str(v.version): {\n"
        "    'tags': v.tags, 'source': v.source, 'run_id': v.run_id,\n"
        "    'run_tags': client.get_run(v.run_id).data.tags,\n"
        "    'params': client.get_run(v.run_id).data.params} for v in versions},\n"
        "    'runs': {r.info.run_id: [r.info.status, r.data.tags.get('pipeline.end_reason', '')]\n"
        "             for r in runs}}))\n"
    )
    done = hosts.run("c", [str(BIN / "python"), "-c", program, name], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def failure_report(said: str, logs: dict[str, str]) -> str:
    """A failed run's story with its own output last (a CI log keeps a failure's tail): the
    workers' error lines first, then the tail of what the client printed."""
    alarming = re.compile(r"ERROR|Traceback|Error:|Crashed|Failed|Timed out", re.IGNORECASE)
    parts = [
        f"--- worker on {host}, error lines:\n"
        + "\n".join(line for line in log.splitlines() if alarming.search(line))[-3000:]
        for host, log in logs.items()
    ]
    return "\n".join([*parts, "--- the client (prefect deployment run --watch):", said[-3000:]])


def test_two_deployment_runs_at_once_train_on_two_worker_hosts(hosts, served, tmp_path):
    """Workers on b and c join with the README's command; two deployment runs triggered
    together from c's shell train one on each host, through the servers only."""
    project, banner = served
    assert "none here (--no-worker)" in banner, banner
    clones = {host: clone_on(project, tmp_path / f"{host}-clone") for host in "bc"}
    workers = {
        host: start_worker(hosts, served, host, clones[host], tmp_path / f"{host}-home")
        for host in "bc"
    }
    shell = tmp_path / "c-shell"
    shell.mkdir()
    env = client_env(hosts, served, shell)
    name = "network-runs"
    try:
        launched = [
            hosts.popen(
                "c",
                [
                    str(BIN / "prefect"),
                    *deployment_run_args(
                        "training-pipeline/train",
                        {
                            "overrides": TINY
                            | {"mlflow.experiment": name, "register.model_name": name}
                            | {"train.seed": seed},
                            "stages": NO_EXPORT,
                        },
                    ),
                ],
                env=env,
                cwd=shell,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for seed in (1, 2)
        ]
        outputs = [process.communicate(timeout=RUN_TIMEOUT_S + 60)[0] for process in launched]
    finally:
        stop(*workers.values())
    logs = {host: (tmp_path / f"{host}-home" / "worker.log").read_text() for host in "bc"}
    for process, output in zip(launched, outputs, strict=True):
        said = " ".join(output.split())
        assert process.returncode == 0, failure_report(said, logs)
        assert re.search(rf"registered {name} version [12]", said), said[-3000:]
    # A flow run's own lines ("View at .../flow-run/<id>") go to the log of its worker.
    ran = {
        flow_run_id(output): [h for h in "bc" if f"flow-run/{flow_run_id(output)}" in logs[h]]
        for output in outputs
    }
    assert sorted(hosts_ for hosts_ in ran.values()) == [["b"], ["c"]], ran  # one on each
    for flow_run, (host,) in ran.items():
        # Its outputs are on its host's disk, in its run directory; none on the server's.
        assert (clones[host] / "runs" / flow_run / "reports" / "registration.json").is_file()
        assert not (project / "runs" / flow_run).exists()
        assert [p.name for p in (clones[host] / "mlruns").iterdir()] == [".gitkeep"], (
            "no local store"
        )

    seen = registry(hosts, env, name)
    versions = seen["versions"]
    assert sorted(versions) == ["1", "2"]
    accuracy = {number: float(v["tags"]["test_accuracy"]) for number, v in versions.items()}
    assert accuracy[seen["aliases"]["champion"]] == max(accuracy.values())
    assert seen["aliases"]["challenger"] == "2"
    held = sorted(
        tuple(map(float, v["run_tags"]["registry.lock_held"].split("-"))) for v in versions.values()
    )
    assert held[0][1] <= held[1][0], f"alias moves overlapped: {held}"
    keys = bucket_keys(hosts, project)
    for version in versions.values():
        tags = version["run_tags"]
        assert tags["registry.lock"] == f"prefect: registry-{name}", "taken on the Prefect server"
        flow_run = Path(tags["pipeline.workdir"]).name
        assert tags["pipeline.workdir"] == str(project / "runs" / flow_run)  # a clone, mounted
        # The model is in the bucket (through the MLflow server: no host holds a bucket key).
        assert any(f"/{version['run_id']}/artifacts/evaluate/" in key for key in keys), keys[:20]
        (model_id,) = re.findall(r"m-[0-9a-f]{32}", version["source"])  # its logged model
        assert any(f"/models/{model_id}/" in k and k.endswith("/MLmodel") for k in keys), keys[:20]


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


WORKER_PORT = 2222  # each host's own port: the README's TF_CONFIG


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout


def team_shell(hosts, served, home: Path) -> dict:
    """A training host's shell: the banner's exports, the copied CA, and the bucket key the
    team hands out (DVC reads it from the environment, as from ~/.aws anywhere)."""
    project, _ = served
    home.mkdir(exist_ok=True)
    env = client_env(hosts, served, home)
    for line in (project / ".pipeline" / "secrets" / "s3.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            env[key] = value
    return env


def use_team_remote(hosts, served, host: str, clone: Path, env: dict) -> None:
    """The banner's DVC remote commands in ``clone``, verifying with the copied CA."""
    _, banner = served
    commands = re.findall(r"^\s+(dvc remote .*)$", banner, re.MULTILINE)
    assert len(commands) == 3, banner  # add -d team, endpointurl, ssl_verify
    for command in commands:
        argv = shlex.split(command)
        if argv[-2] == "ssl_verify":
            argv[-1] = env["SSL_CERT_FILE"]  # this host's copy of the stack's CA
        done = hosts.run(host, [str(BIN / argv[0]), *argv[1:]], env=env, cwd=clone)
        assert done.returncode == 0, done.stdout + done.stderr


def test_multi_worker_training_across_two_hosts_stops_resumes_and_reproduces(
    hosts, served, tmp_path
):
    """README "Multi-device and multi-machine training", on two hosts: b (the chief) runs
    `dvc repro` and c `python -m flows.stage train`, each with its TF_CONFIG; the data goes
    from b to c through the team's DVC remote (the bucket on the server host, over HTTPS)."""
    project, _ = served
    name = "network-multi-worker"
    b = clone_on(project, tmp_path / "b-clone")
    params = {"train.distribute": "multi_worker", "train.epochs": 2}
    set_params(b, TINY | params | {"mlflow.experiment": name, "register.model_name": name})
    git(b, "commit", "-qam", "multi_worker on hosts b and c")
    env = {host: team_shell(hosts, served, tmp_path / f"{host}-home") for host in "bc"}

    def on(host: str, *argv: str, root: Path, timeout: float = RUN_TIMEOUT_S):
        done = hosts.run(host, [str(BIN / argv[0]), *argv[1:]], env=env[host], cwd=root,
                         timeout=timeout)  # fmt: skip
        assert done.returncode == 0, (argv, done.stdout[-3000:], done.stderr[-3000:])
        return done.stdout

    # b: the data stages, their outputs into the team's remote, dvc.lock into git.
    use_team_remote(hosts, served, "b", b, env["b"])
    on("b", "dvc", "repro", "preprocess", root=b)
    on("b", "dvc", "push", root=b)
    git(b, "commit", "-qam", "data version for the multi-worker run")
    c = clone_on(b, tmp_path / "c-clone")  # b's repository stands in for the team's git
    use_team_remote(hosts, served, "c", c, env["c"])
    on("c", "dvc", "pull", "--with-deps", "preprocess", root=c)

    cluster = [f"{hosts.address(host)}:{WORKER_PORT}" for host in "bc"]

    def worker(index: int) -> subprocess.Popen:
        host, root = ("b", b) if index == 0 else ("c", c)
        command = (
            ["dvc", "repro", "register"] if index == 0 else ["python", "-m", "flows.stage", "train"]
        )
        tf_config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        return hosts.popen(
            host,
            [str(BIN / command[0]), *command[1:]],
            env=env[host] | {"TF_CONFIG": json.dumps(tf_config)},
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # Both hosts train; c's worker is killed in epoch 2 (epoch 1 checkpointed on both).
    chief, second = worker(0), worker(1)
    watchdog = threading.Timer(RUN_TIMEOUT_S, second.kill)
    watchdog.start()
    seen = []
    for line in second.stdout:
        seen.append(line)
        if line.startswith("Epoch 2/2"):
            break
    watchdog.cancel()
    second.kill()
    second.wait()
    killed = time.monotonic()
    said = chief.communicate(timeout=STOP_TIMEOUT_S * 2)[0]
    stopped_in = time.monotonic() - killed
    assert chief.returncode != 0, said[-3000:] + "".join(seen)[-2000:]
    (line,) = [x for x in said.splitlines() if "worker 1 at" in x]
    # Named by its address; TensorFlow sees either the connection reset or the missed
    # heartbeats first (both seen here), and the line says which.
    assert line.startswith(f"error in stage 'train': worker 1 at {cluster[1]} "), line
    assert f"so training stopped on this worker (0 at {cluster[0]}) too" in line, line
    assert "each resumes after epoch 1" in line, line
    assert stopped_in < STOP_TIMEOUT_S, f"b stopped {stopped_in:.0f} s after c's worker died"
    print(f"b stopped {stopped_in:.1f} s after c's worker was killed: {line}")

    # The same two commands again: both resume after epoch 1, and b registers the model.
    chief, second = worker(0), worker(1)
    said, other = (p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in (chief, second))
    assert chief.returncode == 0 and second.returncode == 0, said[-3000:] + other[-3000:]
    assert "resuming from epoch 2 of 2" in said, said[-3000:]
    assert "training on 2 replica(s) (multi_worker: 2 workers x 1 device(s))" in said
    assert f"Created version '1' of model '{name}'" in said, said[-3000:]
    found = registry(hosts, env["c"], name)
    assert list(found["versions"]) == ["1"], "one version from the two hosts"
    assert found["versions"]["1"]["params"]["train.replicas_in_sync"] == "2"
    # One run trained the model on both hosts (worker 1 tracks nothing); the killed
    # attempt's run ended FAILED with the same line.
    statuses = sorted(status for status, _ in found["runs"].values())
    assert statuses == ["FAILED", "FINISHED"], found["runs"]
    assert found["runs"][found["versions"]["1"]["run_id"]][0] == "FINISHED"
    (reason,) = [why for status, why in found["runs"].values() if status == "FAILED"]
    assert f"worker 1 at {cluster[1]}" in reason, reason

    # b pushes what dvc.lock records; c pulls the same model by its hash and rebuilds the
    # version from its registry tags (data from the remote), which must match exactly.
    on("b", "dvc", "push", root=b)
    git(b, "commit", "-qam", "the multi-worker model")
    git(c, "pull", "-q", "--no-rebase", "origin", "HEAD")
    on("c", "dvc", "pull", "--with-deps", "register", root=c)  # no export stage ran
    model = "models/model.keras"
    assert (c / model).read_bytes() == (b / model).read_bytes()
    report = on("c", "python", "-m", "flows.reproduce", f"models:/{name}/1", root=c)
    assert "result: MATCH" in report, report[-3000:]
