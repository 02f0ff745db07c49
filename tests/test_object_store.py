"""flows/stack/object_store.py: a real moto server on loopback answers only its bootstrap key."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import NamedTuple

import pytest

from flows.stack import object_store
from flows.stack.object_store import S3Credentials
from tests.helpers.team_servers import S3Server

BUCKET = "pipeline-store"


class Store(NamedTuple):
    endpoint: str
    creds: S3Credentials


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = S3Server.start(BUCKET, log)
    try:
        yield Store(server.endpoint, server.credentials)
    finally:
        returncode = server.stop()
    assert returncode == 0, log.read_text()[-3000:]


def s3(store: Store, creds: S3Credentials | None = None, **config):
    import boto3
    from botocore.config import Config

    creds = creds or store.creds
    return boto3.client(
        "s3",
        endpoint_url=store.endpoint,
        region_name="us-east-1",
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key,
        config=Config(retries={"total_max_attempts": 1}, **config),
    )


def refusal(call) -> tuple[int, str]:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as caught:
        call()
    response = caught.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def http_status(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_bootstrap_credential_puts_and_lists(store):
    client = s3(store)
    client.put_object(Bucket=BUCKET, Key="runs/a.txt", Body=b"a")
    client.put_object(Bucket=BUCKET, Key="dvc/b.txt", Body=b"b")

    assert {"runs/a.txt", "dvc/b.txt"} <= set(object_store.list_keys(*store, BUCKET))
    assert object_store.list_keys(*store, BUCKET, prefix="runs/") == ["runs/a.txt"]
    assert client.get_object(Bucket=BUCKET, Key="runs/a.txt")["Body"].read() == b"a"


def test_the_credential_reaches_its_bucket_only(store):
    assert refusal(lambda: s3(store).create_bucket(Bucket="another-bucket")) == (
        403,
        "AccessDenied",
    )


def test_anonymous_requests_are_refused(store):
    from botocore import UNSIGNED

    unsigned = s3(store, signature_version=UNSIGNED)
    assert refusal(lambda: unsigned.list_objects_v2(Bucket=BUCKET))[0] == 403
    assert refusal(lambda: unsigned.put_object(Bucket=BUCKET, Key="x", Body=b"x"))[0] == 403
    assert http_status(f"{store.endpoint}/{BUCKET}")[0] == 403

    strangers = S3Credentials("AKIAUNKNOWN000000000", "whatever")
    assert refusal(lambda: s3(store, strangers).list_objects_v2(Bucket=BUCKET)) == (
        403,
        "InvalidAccessKeyId",
    )


def test_a_wrong_secret_is_refused(store):
    forged = S3Credentials(store.creds.access_key_id, "not-the-secret")
    assert refusal(lambda: s3(store, forged).list_objects_v2(Bucket=BUCKET)) == (
        403,
        "SignatureDoesNotMatch",
    )
    assert (
        refusal(lambda: s3(store, forged).put_object(Bucket=BUCKET, Key="x", Body=b"x"))[0] == 403
    )


def test_motos_control_api_is_off(store):
    """Unguarded, /moto-api/ would hand out the secret and switch authentication off. The
    requests carry an Authorization header, so the service filter is what refuses them."""
    signed = {"Authorization": f"AWS4-HMAC-SHA256 Credential={store.creds.access_key_id}/x"}
    status, body = http_status(f"{store.endpoint}/moto-api/data.json", headers=signed)
    assert status == 403 and b"control API is off" in body
    assert store.creds.secret_access_key.encode() not in body
    reset = http_status(f"{store.endpoint}/moto-api/reset-auth", "POST", b"inf", signed)
    assert reset[0] == 403 and b"control API is off" in reset[1]

    assert http_status(f"{store.endpoint}/{BUCKET}")[0] == 403  # still required


def test_bootstrap_is_idempotent_for_the_bucket_and_mints_one_credential(store):
    s3(store).put_object(Bucket=BUCKET, Key="kept.txt", Body=b"k")

    object_store.ensure_bucket(store.endpoint, store.creds, BUCKET)
    with pytest.raises(object_store.ObjectStoreError, match="refused bootstrap"):
        object_store.bootstrap(store.endpoint, BUCKET)

    assert "kept.txt" in object_store.list_keys(*store, BUCKET)


def test_client_env_is_all_boto3_needs(store, monkeypatch):
    import boto3

    for key in [key for key in os.environ if key.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in object_store.client_env(store.endpoint, store.creds).items():
        monkeypatch.setenv(key, value)

    boto3.client("s3").put_object(Bucket=BUCKET, Key="from-env.txt", Body=b"e")

    assert "from-env.txt" in object_store.list_keys(*store, BUCKET)
