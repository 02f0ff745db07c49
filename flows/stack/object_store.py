"""A local S3-compatible store that requires a credential: moto's server, for trying the team
setup (MLflow artifacts and the DVC remote on S3) and for tests.

    python -m flows.stack.object_store [--host 127.0.0.1] [--port 9000]

Plain `moto_server` answers anyone: it accepts unsigned requests and serves its control API
(/moto-api/) without a credential, which dumps every stored secret (data.json) and turns
authentication off (reset-auth). So the server runs behind a guard (`serve`) that answers only
signed requests and only for S3 and IAM, and moto checks every request against its IAM after
the first BOOTSTRAP_REQUESTS (INITIAL_NO_AUTH_ACTION_COUNT). Those few unauthenticated
requests are `bootstrap`'s: it creates the user 'pipeline', an access key and a policy that
allows s3:* on one bucket, and checks that the window closed behind it. Whoever starts the
server and bootstraps it right away holds the only credential; if another process used the
window first, bootstrap fails rather than hand out a credential that process also has.

Everything lives in memory: stopping the server loses the buckets and the credential.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The unauthenticated requests moto accepts: CreateUser, CreateAccessKey and PutUserPolicy.
# Exactly that many, so none is left for anyone else once bootstrap is done.
BOOTSTRAP_REQUESTS = 3
USER = "pipeline"
REGION = "us-east-1"
DEFAULT_PORT = 9000
SERVICES = frozenset({"s3", "iam"})  # the only moto backends the guard lets requests reach

# For MLflow clients of a tracking server that keeps its artifacts here. Such a server tells its
# clients (server-info) to fetch artifacts straight from the store through presigned URLs, which
# moto's IAM checks cannot verify (it reads only the Authorization header), so every download
# would fail after minutes of retries. With these, uploads and downloads go through the server,
# the only process that holds the store's credential.
MLFLOW_CLIENT_ENV = {
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
}

# boto3 signs every request; the key is irrelevant inside moto's unauthenticated window.
_ANONYMOUS = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}


class ObjectStoreError(RuntimeError):
    """The store is not up, or it cannot be given exactly one credential; the message says why."""


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)  # never in a log or a traceback's locals


def moto_command(host: str, port: int, tls: tuple[Path, Path] | None = None) -> list[str]:
    """`serve` in a fresh interpreter: moto reads INITIAL_NO_AUTH_ACTION_COUNT when it is first
    imported, so the server needs its own process (and moto_env). Run it from the repository
    root, or with the project installed, so that `flows` imports. ``tls``: the certificate
    and key to serve HTTPS with (the stack's, on a team-network address)."""
    command = [sys.executable, "-m", "flows.stack.object_store", "--host", host]
    if tls:
        command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    return [*command, "--port", str(port)]


def moto_env(base: dict[str, str]) -> dict[str, str]:
    """`base` with moto's IAM checks on after bootstrap's requests, and no CORS headers, so
    that a web page the user visits cannot read the store's answers either."""
    return base | {
        "INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_REQUESTS),
        "MOTO_DISABLE_GLOBAL_CORS": "true",
    }


def wait_until_up(endpoint: str, timeout_s: float = 60, cafile: str | None = None) -> None:
    """Return once the server answers HTTP. The probe is unsigned, so the guard refuses it
    before moto counts it: it never uses up one of bootstrap's requests. ``cafile``: what to
    trust on an HTTPS endpoint besides the system's CAs' certificates."""
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(endpoint.rstrip("/") + "/", timeout=2, context=context):
                return
        except urllib.error.HTTPError:
            return  # an answer, refused as expected
        except (OSError, ValueError) as exc:  # not listening yet, or a malformed endpoint
            last = exc
            if isinstance(exc, ValueError):
                break
        time.sleep(0.1)
    raise ObjectStoreError(
        f"no S3 store answered at {endpoint} within {timeout_s:g} s (last error: {last}); "
        "see the server's output for why it did not start"
    )


def _client(
    service: str,
    endpoint: str,
    creds: S3Credentials | None,
    retries: int = 3,
    cafile: str | None = None,
) -> Any:
    import boto3
    from botocore.config import Config

    keys = (
        _ANONYMOUS
        if creds is None
        else {
            "aws_access_key_id": creds.access_key_id,
            "aws_secret_access_key": creds.secret_access_key,
        }
    )
    config = Config(retries={"total_max_attempts": retries, "mode": "standard"})
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        config=config,
        verify=cafile,  # None: botocore's default (AWS_CA_BUNDLE, else the system's CAs)
        **keys,
    )


def _policy(bucket: str) -> str:
    """s3:* on the bucket and its objects only: moto enforces the Resource for S3."""
    resources = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    statement = {"Effect": "Allow", "Action": "s3:*", "Resource": resources}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def _error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def bootstrap(endpoint: str, bucket: str, cafile: str | None = None) -> S3Credentials:
    """Spend moto's unauthenticated requests on the only credential, then create `bucket`
    with it. Works once per server: afterwards IAM refuses unsigned calls, which is the point.
    Every IAM call is tried once, since a retry would be one more unauthenticated request."""
    from botocore.exceptions import ClientError

    iam = _client("iam", endpoint, None, retries=1, cafile=cafile)
    try:
        iam.create_user(UserName=USER)
        key = iam.create_access_key(UserName=USER)["AccessKey"]
        iam.put_user_policy(
            UserName=USER, PolicyName=f"s3-{bucket}", PolicyDocument=_policy(bucket)
        )
    except ClientError as exc:
        raise ObjectStoreError(
            f"the store at {endpoint} refused bootstrap ({_error_code(exc) or exc}): it was "
            "bootstrapped already, or another process used its unauthenticated requests first. "
            "Start a fresh server and bootstrap it right away."
        ) from exc
    creds = S3Credentials(key["AccessKeyId"], key["SecretAccessKey"])
    _check_window_closed(endpoint, cafile)
    ensure_bucket(endpoint, creds, bucket, cafile)
    return creds


def _check_window_closed(endpoint: str, cafile: str | None = None) -> None:
    """A server started without moto_env would let anyone in; say so instead of pretending."""
    from botocore.exceptions import ClientError

    try:
        _client("iam", endpoint, None, retries=1, cafile=cafile).get_user(UserName=USER)
    except ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 403:
            return
        raise
    raise ObjectStoreError(
        f"the store at {endpoint} still answers unauthenticated requests: start it with "
        f"moto_env (INITIAL_NO_AUTH_ACTION_COUNT={BOOTSTRAP_REQUESTS})"
    )


def ensure_bucket(
    endpoint: str, creds: S3Credentials, bucket: str, cafile: str | None = None
) -> None:
    """Create `bucket` unless this credential owns it already, so a setup can run twice."""
    from botocore.exceptions import ClientError

    try:
        _client("s3", endpoint, creds, cafile=cafile).create_bucket(Bucket=bucket)
    except ClientError as exc:
        if _error_code(exc) != "BucketAlreadyOwnedByYou":
            raise


def client_env(endpoint: str, creds: S3Credentials) -> dict[str, str]:
    """What a process that talks to the store needs: boto3 (>= 1.28 reads AWS_ENDPOINT_URL),
    DVC's s3 remote (the keys and AWS_ENDPOINT_URL too; an `endpointurl` in the remote's
    config does instead) and MLflow's S3 artifact store (MLFLOW_S3_ENDPOINT_URL). The region
    is fixed because moto, like AWS, scopes signatures to it."""
    return {
        "AWS_ACCESS_KEY_ID": creds.access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


def list_keys(endpoint: str, creds: S3Credentials, bucket: str, prefix: str = "") -> list[str]:
    """Every key under `prefix`, for checks that artifacts really landed in the store."""
    pages = _client("s3", endpoint, creds).get_paginator("list_objects_v2")
    return [
        obj["Key"]
        for page in pages.paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]


def _refuse(start_response: Any, status: str, code: str, message: str) -> list[bytes]:
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
    start_response(
        status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _guarded_app() -> Any:
    """moto's WSGI app, less what answers without a credential: unsigned requests (moto
    would count them against bootstrap's window, and answers 500 for them afterwards) and
    every backend but S3 and IAM (its control API, fake instance metadata, 100+ services)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    def refused(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        message = "Only S3 and IAM are served here; moto's control API is off."
        return _refuse(start_response, "403 Forbidden", "AccessDenied", message)

    def create_app(service: str) -> Any:
        return create_backend_app(service) if service in SERVICES else refused

    moto = DomainDispatcherApplication(create_app)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if not environ.get("HTTP_AUTHORIZATION"):
            message = "Sign the request with the store's credential (no presigned URLs)."
            return _refuse(start_response, "403 Forbidden", "AccessDenied", message)
        return moto(environ, start_response)

    return app


def serve(host: str, port: int, tls: tuple[str, str] | None = None) -> None:
    """Run the guarded server until SIGTERM or Ctrl-C, which end it with status 0; over
    HTTPS with ``tls`` (certificate, key)."""
    # moto reads its settings on first import, so they go in first, whatever the caller set.
    os.environ.update(moto_env({}), MOTO_PORT=str(port))  # MOTO_PORT: its requests to itself
    from moto import settings
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import run_simple

    if settings.INITIAL_NO_AUTH_ACTION_COUNT != BOOTSTRAP_REQUESTS:
        raise SystemExit("moto was imported before its settings: it would ask no credential")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: sys.exit(0))
    run_simple(
        host,
        port,
        _guarded_app(),
        threaded=True,
        request_handler=MotoRequestHandler,
        ssl_context=tls,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback unless you mean otherwise")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="and its private key")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    serve(args.host, args.port, (args.tls_cert, args.tls_key) if args.tls_cert else None)


if __name__ == "__main__":
    main()
