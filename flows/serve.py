"""`make serve`: a Prefect server, a worker and an MLflow tracking server on loopback.

    python -m flows.serve [--host 127.0.0.1] [--prefect-port 4200] [--mlflow-port 5000]
        [--database-url postgresql://... | --local-postgres] [--artifacts-destination s3://...]
        [--local-s3] [--worker-limit N] [--tls | --tls-cert C --tls-key K | --insecure-http]

Starts the MLflow tracking server over the project's store (params.yaml `mlflow:`; by
default mlruns/mlflow.db, artifacts under mlruns/artifacts, uploaded through the server)
and the Prefect server (SQLite under PREFECT_HOME, ~/.prefect by default). Then creates
the process work pool if it is missing, registers prefect.yaml's deployments (`prefect
deploy --all`) and starts a worker on the pool whose flow runs log to the tracking server
(MLFLOW_TRACKING_URI). Prints the URLs once the worker is polling, and waits.

Team setup (README): ``--database-url`` (or PIPELINE_DATABASE_URL) puts MLflow's store and
Prefect's database on a PostgreSQL server (flows/stack/postgres.py; MLflow's schema migrations
run first, Prefect runs its own); ``--local-postgres`` starts a throwaway one first and
supervises it: if it dies, it is started again (``--postgres-restarts``, 3 by default;
both servers and MLflow's clients reconnect, flow runs go on), then everything stops.
``--artifacts-destination s3://bucket/prefix`` stores MLflow artifacts in a bucket (the
server reads AWS_* and MLFLOW_S3_ENDPOINT_URL from the environment; clients upload and
download through the server); ``--local-s3`` starts moto's S3 emulator with a generated
credential (flows/stack/object_store.py) on the servers' address and scheme, and uses it
for artifacts; other hosts use its bucket as their DVC remote.

Off loopback (``--host <address>``) both servers speak HTTPS: with the user's certificate
(``--tls-cert``/``--tls-key``) or with the stack's own CA, made on first start
(flows/stack/tls.py); the banner exports what clients need to trust it. ``--insecure-http``
serves plain HTTP there instead, and the banner says what that gives up.

Both servers require the stack's credential (flows/stack/security.py: generated on first
start into .pipeline/secrets/api-credential, mode 0600, or PREFECT_SERVER_API_AUTH_STRING),
answer browsers only from their own origins, and the work pool accepts no job variables.

Ctrl-C or SIGTERM stops the worker, any flow runs in progress and the servers. A port
already in use stops it before anything starts. Each service logs to
.pipeline/serve/<service>.log; if one dies (PostgreSQL: with its restarts spent), the launcher
stops the rest and shows its log.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flows.stack import object_store, postgres, security, tls
from flows.stack.backing import (
    LOCAL_BUCKET,
    S3_ENV_FILE,
    Backing,
    proxy_experiments,
    start_backing,
)
from flows.stack.env import (
    DATABASE_URL_ENV,
    Endpoints,
    client_env,
    mlflow_server_env,
    prefect_server_env,
)
from flows.stack.services import (
    LOG_DIR,
    LOG_TAIL_CHARS,
    PortInUse,
    ServeError,
    Service,
    check_ports,
    exit_reason,
    stop_all,
    wait_for,
)
from tasks.tracking import views

POOL = "local-process"  # the work pool prefect.yaml's deployments name
# Prefect's recipe for zombie flow runs (docs: "Detect and respond to zombie flows"): a flow
# run whose heartbeats stop (its host died, its process was killed with the worker, the
# stack stopped under it) is marked Crashed. Flow runs beat every 180 s by default, every
# HEARTBEAT_S under this stack's worker; the window tolerates one late beat of a default worker.
UNRESPONSIVE = "crash-unresponsive-flow-runs"
UNRESPONSIVE_AFTER_S = 300


def unresponsive_automation(after_s: int = UNRESPONSIVE_AFTER_S) -> dict[str, Any]:
    ends = ["Completed", "Failed", "Cancelled", "Crashed"]
    return {
        "name": UNRESPONSIVE,
        "description": f"A flow run silent for {after_s} s (no heartbeat, no end state) is "
        "marked Crashed: its process or host is gone. Created by flows.serve.",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ends)],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": after_s,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": f"no heartbeat for {after_s} s: its process or host is gone",
            }
        ],
    }


class Shutdown(Exception):
    """SIGTERM arrived: stop as on Ctrl-C."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default loopback); any other address serves HTTPS (--tls-cert "
        "or the stack's own CA) unless --insecure-http",
    )
    parser.add_argument(
        "--tls", action="store_true", help="serve HTTPS on loopback too (the stack's own CA)"
    )
    parser.add_argument("--tls-cert", help="the servers' certificate (PEM, chain) instead of ours")
    parser.add_argument("--tls-key", help="its private key (PEM, unencrypted), with --tls-cert")
    parser.add_argument(
        "--tls-ca", help="with --tls-cert: the CA clients must trust, when it is not a public one"
    )
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help="plain HTTP on a non-loopback --host: the credential and all data cross the "
        "network readable and changeable by anyone on it",
    )
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--pool", default=POOL, help="process work pool the worker polls")
    parser.add_argument("--params", default="params.yaml", help="where the MLflow store is set")
    parser.add_argument("--no-deploy", action="store_true", help="skip `prefect deploy --all`")
    parser.add_argument(
        "--mlflow-only",
        action="store_true",
        help="only the MLflow server (`make ui`): browse the store with the same protections",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV),
        help=f"PostgreSQL for MLflow and Prefect, postgresql://USER:PASSWORD@HOST:PORT/postgres "
        f"(default ${DATABASE_URL_ENV}; unset: SQLite files)",
    )
    parser.add_argument(
        "--local-postgres",
        action="store_true",
        help="start a throwaway PostgreSQL (.pipeline/postgres) on 127.0.0.1 and use it",
    )
    parser.add_argument("--postgres-port", type=int, default=5433, help="for --local-postgres")
    parser.add_argument(
        "--postgres-restarts",
        type=int,
        default=3,
        help="for --local-postgres: times it is started again when it dies (its clients "
        "reconnect) before everything stops (default 3)",
    )
    parser.add_argument(
        "--artifacts-destination",
        help="where the MLflow server stores artifacts, e.g. s3://bucket/mlflow (default: "
        "params.yaml mlflow.artifact_root)",
    )
    parser.add_argument(
        "--local-s3",
        action="store_true",
        help="start moto's S3 emulator (in memory) on the servers' address and keep artifacts "
        "there; the banner prints the DVC remote lines for it",
    )
    parser.add_argument("--s3-port", type=int, default=9000, help="for --local-s3")
    parser.add_argument(
        "--worker-limit", type=int, help="flow runs the worker runs at once (default: any)"
    )
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="the servers only: flow runs wait for workers started on the training hosts",
    )
    parser.add_argument(
        "--no-mlflow-auth",
        action="store_true",
        help="MLflow server without its basic-auth app (it still checks Host and CORS)",
    )
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together: the certificate and its key")
    if args.tls_ca and not args.tls_cert:
        parser.error("--tls-ca names the CA of --tls-cert: the stack's own CA needs neither")
    if args.insecure_http and (args.tls or args.tls_cert):
        parser.error("--insecure-http turns TLS off: drop it, or drop --tls/--tls-cert")
    if args.local_postgres and args.database_url:
        parser.error("--local-postgres starts its own database: drop --database-url")
    if args.local_s3 and args.artifacts_destination:
        parser.error("--local-s3 chooses the artifacts destination: drop --artifacts-destination")
    return args


def mlflow_store(project: Path, params: str) -> tuple[str, str]:
    """(backend store URI, artifact directory) from params.yaml, relative to the project."""
    from flows.rundir import anchored_path, anchored_uri
    from tasks.config import load_config

    cfg = load_config(project / params).mlflow
    return anchored_uri(cfg.tracking_uri, project), anchored_path(cfg.artifact_root, project)


def served_store(args: argparse.Namespace, project: Path, backing: Backing) -> tuple[str, str]:
    """(backend store URI, artifacts destination) of the MLflow server."""
    backend, artifacts = mlflow_store(project, args.params)
    store = backing.databases["mlflow"] if backing.databases else backend
    return store, backing.artifacts or artifacts


def serves_tls(args: argparse.Namespace) -> bool:
    """HTTPS when asked, and always off loopback unless --insecure-http says otherwise."""
    if args.tls or args.tls_cert:
        return True
    return not tls.is_loopback(args.host) and not args.insecure_http


def prefect_server_command(args: argparse.Namespace, certs: tls.TlsFiles | None) -> list[str]:
    """`prefect server start`; over TLS, the uvicorn command it runs, with the certificate
    (its own command has no TLS options). PREFECT__SERVER_FINAL is set in its env."""
    bin_dir = Path(sys.executable).parent
    if certs is None:
        start = [str(bin_dir / "prefect"), "server", "start"]
        return [*start, "--host", args.host, "--port", str(args.prefect_port)]
    import prefect

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        args.host,
        "--port",
        str(args.prefect_port),
        "--ssl-certfile",
        str(certs.cert),
        "--ssl-keyfile",
        str(certs.key),
    ]


def build_services(
    args: argparse.Namespace,
    project: Path,
    ends: Endpoints,
    credential: str,
    backing: Backing,
    certs: tls.TlsFiles | None = None,
) -> list[Service]:
    """The MLflow server, the Prefect server and the worker, in start order (the MLflow
    server alone with --mlflow-only); both servers over HTTPS with ``certs``."""
    bin_dir = Path(sys.executable).parent  # the virtualenv's console scripts
    store, destination = served_store(args, project, backing)
    log_dir = project / LOG_DIR
    mlflow = [str(bin_dir / "mlflow"), "server"]
    mlflow += ["--artifacts-destination", destination]
    mlflow += ["--serve-artifacts", "--workers", "1"]
    mlflow += ["--host", args.host, "--port", str(args.mlflow_port)]
    mlflow += ["--allowed-hosts", ends.hosts(args.mlflow_port)]
    mlflow += ["--cors-allowed-origins", ends.origins(args.mlflow_port)]
    if not args.no_mlflow_auth:
        mlflow += ["--app-name", "basic-auth"]
    if certs is not None:
        ssl_opts = ["--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
        mlflow += ["--uvicorn-opts", shlex.join(ssl_opts)]
    prefect = prefect_server_command(args, certs)
    worker = [str(bin_dir / "prefect"), "worker", "start", "--pool", args.pool, "--type", "process"]
    if args.worker_limit:
        worker += ["--limit", str(args.worker_limit)]
    mlflow_env = mlflow_server_env(project, None if args.no_mlflow_auth else credential)
    # The store's URL through the environment, never argv: it may hold a password.
    mlflow_env |= backing.s3_env | {"MLFLOW_BACKEND_STORE_URI": store}
    mlflow_service = Service("MLflow server", mlflow, log_dir / "mlflow.log", mlflow_env)
    if args.mlflow_only:
        return [mlflow_service]
    prefect_env = prefect_server_env(ends, credential)
    if certs is not None:
        prefect_env["PREFECT__SERVER_FINAL"] = "1"  # as `prefect server start` sets it
    if backing.databases:
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = backing.databases["prefect"]
    worker_env = client_env(ends, credential, not args.no_mlflow_auth, trust(certs))
    servers = [
        mlflow_service,
        Service("Prefect server", prefect, log_dir / "prefect-server.log", prefect_env),
    ]
    if args.no_worker:
        return servers
    return [*servers, Service("Prefect worker", worker, log_dir / "worker.log", worker_env)]


def pool_ready(pool: dict[str, Any]) -> bool:
    return pool["status"] == "READY"


def trust(certs: tls.TlsFiles | None) -> dict[str, str]:
    return certs.client_env() if certs is not None else {}


def prefect_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "prefect"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def lock_work_pool(pool: str, env: dict[str, str], project: Path) -> None:
    """Create the process work pool, or reset an existing one, with the locked job template:
    an API caller can then set no command, env or working directory for a flow run."""
    template = project / LOG_DIR / "locked-job-template.json"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text(json.dumps(security.LOCKED_JOB_TEMPLATE, indent=2))
    if prefect_cli(["work-pool", "inspect", pool], env, project).returncode != 0:
        command = ["work-pool", "create", pool, "--type", "process"]
    else:
        command = ["work-pool", "update", pool]
    done = prefect_cli([*command, "--base-job-template", str(template)], env, project)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        raise ServeError(f"could not set up work pool {pool!r}:\n{output}")


def crash_unresponsive_runs(env: dict[str, str], project: Path) -> None:
    """Create the automation that ends zombie flow runs Crashed, once per Prefect database."""
    if prefect_cli(["automation", "inspect", UNRESPONSIVE], env, project).returncode == 0:
        return
    spec = project / LOG_DIR / "unresponsive-automation.json"
    spec.write_text(json.dumps(unresponsive_automation(), indent=2))
    done = prefect_cli(["automation", "create", "--from-file", str(spec)], env, project)
    if done.returncode != 0:
        raise ServeError(
            f"could not create automation {UNRESPONSIVE!r}:\n{done.stdout}{done.stderr}"
        )


def register_deployments(pool: str, env: dict[str, str], project: Path, deploy: bool) -> None:
    """Lock the work pool (created if missing), make sure zombie flow runs end Crashed, and
    `prefect deploy --all` from the project."""
    lock_work_pool(pool, env, project)
    crash_unresponsive_runs(env, project)
    if deploy:
        deployed = prefect_cli(["--no-prompt", "deploy", "--all"], env, project)
        if deployed.returncode != 0:
            output = (deployed.stdout + deployed.stderr)[-LOG_TAIL_CHARS:]
            raise ServeError(f"`prefect deploy --all` failed:\n{output}")


def stores(args: argparse.Namespace, backing: Backing, project: Path) -> str:
    """The banner's lines on where runs, flow runs and artifacts are kept (no passwords)."""
    lines = []
    if backing.databases:
        for name, url in backing.databases.items():
            lines.append(f"  {name + ' db':<12} {postgres.redacted(url)}")
    if backing.artifacts:
        lines.append(f"  artifacts    {backing.artifacts}")
    if args.local_s3:
        endpoint = backing.s3_env["MLFLOW_S3_ENDPOINT_URL"]
        lines.append(
            f"  S3 emulator  {endpoint} (moto, in memory: gone when it stops); credential in "
            f"{project / S3_ENV_FILE}\n"
            f"               DVC remote: set -a; . {S3_ENV_FILE}; set +a\n"
            f"                 dvc remote add --local -d team s3://{LOCAL_BUCKET}/dvc\n"
            f"                 dvc remote modify --local team endpointurl {endpoint}"
        )
        if ca := backing.s3_env.get("AWS_CA_BUNDLE"):  # DVC's s3fs asks for the CA itself
            lines.append(f"                 dvc remote modify --local team ssl_verify {ca}")
    return "".join(f"\n{line}" for line in lines)


# MLflow 3 starts a new browser in its GenAI layout; the switch is stored per browser.
LAYOUT_NOTE = 'a new browser starts in GenAI: click "Model training" at the top left once'


def banner(
    args: argparse.Namespace,
    ends: Endpoints,
    project: Path,
    credential_file: Path,
    backing: Backing,
    certs: tls.TlsFiles | None = None,
) -> str:
    """What a user needs: URLs, and export lines naming the credential file, never its text."""
    if certs is None:
        transport = (
            f"\n  WARNING      plain HTTP on {args.host} (--insecure-http): the credential and "
            "all data cross the network readable and changeable by anyone on it"
            if not tls.is_loopback(args.host)
            else ""
        )
        trust_exports = ""
    else:
        ca = project / tls.TLS_DIR / "ca.pem" if certs.trust and not args.tls_cert else None
        transport = f"\n  TLS          {certs.cert}" + (
            f"\n               clients on other hosts: copy {ca} and point the variables "
            "below at it"
            if ca
            else ""
        )
        trust_exports = (
            "\n  export " + " ".join(f"{key}={value}" for key, value in certs.client_env().items())
            if certs.trust
            else ""
        )
    mlflow_exports = (
        '\n  export MLFLOW_TRACKING_USERNAME="${PREFECT_API_AUTH_STRING%%:*}"'
        ' MLFLOW_TRACKING_PASSWORD="${PREFECT_API_AUTH_STRING#*:}"'
        if not args.no_mlflow_auth
        else ""
    )
    if (backing.artifacts or "").startswith("s3://"):  # downloads through the server too
        mlflow_exports += "\n  export " + " ".join(
            f"{key}={value}" for key, value in object_store.MLFLOW_CLIENT_ENV.items()
        )
    mlflow_login = (
        "user name and password: the two parts of that line"
        if not args.no_mlflow_auth
        else "no credential (--no-mlflow-auth)"
    )
    kept = stores(args, backing, project) + transport
    worker_line = (
        f"none here (--no-worker): flow runs of pool {args.pool!r} wait for a worker on a "
        f"training host, with the repository at {project}"
        if args.no_worker
        else f"polling work pool {args.pool!r}; flow runs write to {project}/runs/<flow-run-id>/"
    )
    if args.mlflow_only:
        return f"""
Serving the MLflow UI on {ends.mlflow_url} over the project's store; Ctrl-C stops it.{kept}
  open         {ends.mlflow_url}/#/experiments?{views.MODEL_TRAINING}
               {LAYOUT_NOTE}
  credential   {credential_file} (user:password, mode 0600)
               MLflow UI login: {mlflow_login}
""".rstrip()
    return f"""
Serving on {args.host}; Ctrl-C stops everything.{kept}
  Prefect UI   {ends.prefect_url}
  Prefect API  {ends.prefect_url}/api
  MLflow UI    {ends.mlflow_url}/#/experiments?{views.MODEL_TRAINING}
               {LAYOUT_NOTE}
  worker       {worker_line}
  logs         {project / LOG_DIR}/{{mlflow,prefect-server,worker}}.log
  credential   {credential_file} (user:password, mode 0600)
               Prefect UI login: the whole line; MLflow UI: {mlflow_login}

In another shell (virtualenv active, in {project}):
  export PREFECT_API_URL={ends.prefect_url}/api MLFLOW_TRACKING_URI={ends.mlflow_url}
  export PREFECT_API_AUTH_STRING="$(cat {credential_file})"{mlflow_exports}{trust_exports}
  prefect deployment run 'training-pipeline/train' -p overrides='{{"train.epochs": 3}}' --watch
""".rstrip()


def serve(args: argparse.Namespace, project: Path, services: list[Service]) -> None:
    """Start everything, print the banner, then watch the services until one dies."""
    credential_file, credential = security.ensure_credential(project, dict(os.environ))
    certs = None
    if args.tls_cert:
        certs = tls.user_certificates(args.tls_cert, args.tls_key, args.tls_ca)
    elif serves_tls(args):
        certs = tls.stack_certificates(project, args.host)
    scheme = "https" if certs else "http"
    ends = Endpoints(args.host, args.prefect_port, args.mlflow_port, scheme)
    context = certs.ssl_context() if certs else None
    backing = start_backing(args, project, services, certs)
    proxy_experiments(*served_store(args, project, backing))  # before any client uses them
    stack = build_services(args, project, ends, credential, backing, certs)
    services.extend(stack)
    for service in stack[:2]:
        service.start(project)  # both servers start at once: about 10 s instead of 20
    wait_for(stack[0], f"{ends.mlflow_url}/health", context=context)
    if not args.mlflow_only:
        prefect_server = stack[1]
        wait_for(prefect_server, f"{ends.prefect_url}/api/health", context=context)
        clients = client_env(ends, credential, not args.no_mlflow_auth, trust(certs))
        register_deployments(args.pool, clients, project, deploy=not args.no_deploy)
        if not args.no_worker:
            worker = stack[2]
            worker.start(project)
            pool_url = f"{ends.prefect_url}/api/work_pools/{args.pool}"
            wait_for(worker, pool_url, pool_ready, credential, context=context)
    print(banner(args, ends, project, credential_file, backing, certs), flush=True)
    while True:
        for service in services:
            if (code := service.exit_code()) is None:
                continue
            if not service.max_restarts:
                raise service.failure(f"stopped unexpectedly ({exit_reason(code)})")
            service.restart(project, code)  # PostgreSQL: its clients reconnect on their own
        time.sleep(1)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Shutdown


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    project = Path.cwd()
    services: list[Service] = []
    ports = {"MLflow server": args.mlflow_port}
    if not args.mlflow_only:
        ports["Prefect server"] = args.prefect_port
    if args.local_postgres:
        ports["PostgreSQL"] = args.postgres_port
    if args.local_s3:
        ports["S3 emulator"] = args.s3_port
    previous_term = signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C must work even when started with SIGINT ignored (a background job of a script).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_ports(args.host, ports)
        serve(args, project, services)
    except (PortInUse, security.CredentialError, postgres.PostgresError, tls.TlsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ServeError, object_store.ObjectStoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Shutdown):
        what = "the MLflow server" if args.mlflow_only else "the servers"
        what += "" if args.mlflow_only or args.no_worker else " and the worker"
        print(f"\nstopping {what} ...", flush=True)
        return 0
    finally:
        # No second Ctrl-C may cut the cleanup short and leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_all(services)
        if services:
            print("stopped", flush=True)
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
    return 0


if __name__ == "__main__":
    sys.exit(main())
