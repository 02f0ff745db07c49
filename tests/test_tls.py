"""TLS for a stack served beyond loopback (flows/stack/tls.py, flows.serve's TLS options).

Real certificates and real handshakes on loopback: the stack's CA signs a server
certificate for the served address; a client trusting the CA connects, one that does not
is refused, and our commands say so in one line. The whole stack over HTTPS from another
host is tests/test_network_hosts.py.
"""

from __future__ import annotations

import http.server
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows import serve
from flows.stack import tls
from tasks.tracking import store


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_stack_makes_its_ca_and_a_certificate_for_the_served_address(tmp_path):
    from cryptography import x509

    files = tls.stack_certificates(tmp_path, "10.20.30.40")
    folder = tmp_path / tls.TLS_DIR
    assert mode(folder) == 0o700
    assert mode(files.key) == 0o600 and mode(folder / "ca-key.pem") == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(entry.value) for entry in names} == {"10.20.30.40", "127.0.0.1", "localhost"}
    assert (folder / "ca.pem").read_text() in files.trust.read_text(), "our CA is trusted"
    assert len(files.trust.read_text()) > len((folder / "ca.pem").read_text()), "and others"
    assert set(files.client_env().values()) == {str(files.trust)}

    again = tls.stack_certificates(tmp_path, "10.20.30.40")
    assert again.cert.read_bytes() == files.cert.read_bytes(), "reused"
    moved = tls.stack_certificates(tmp_path, "10.20.30.41")
    reissued = x509.load_pem_x509_certificate(moved.cert.read_bytes())
    reissued.verify_directly_issued_by(ca)  # the same CA: clients keep their ca.pem
    assert reissued.serial_number != cert.serial_number


@contextmanager
def https_server(files: tls.TlsFiles) -> Iterator[str]:
    """A loopback HTTPS server answering 200 on /health, with ``files``' certificate."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_trusts_the_server_only_with_the_ca(tmp_path, monkeypatch):
    files = tls.stack_certificates(tmp_path, "127.0.0.1")
    monkeypatch.delenv(store.CERT_PATH_ENV, raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with https_server(files) as url:
        with pytest.raises(store.TrackingUntrusted) as refused:
            store.wait_for_server(url, limit_s=5)
        message = str(refused.value)
        assert url in message and "does not trust" in message
        assert "ca.pem" in message and store.CERT_PATH_ENV in message
        monkeypatch.setenv(store.CERT_PATH_ENV, str(files.trust))
        store.wait_for_server(url, limit_s=5)  # answers: trusted


def test_a_users_certificate_must_load_with_its_key(tmp_path):
    first = tls.stack_certificates(tmp_path / "a", "127.0.0.1")
    second = tls.stack_certificates(tmp_path / "b", "127.0.0.1")
    loaded = tls.user_certificates(str(first.cert), str(first.key), None)
    assert loaded.trust is None and loaded.client_env() == {}
    with pytest.raises(tls.TlsError, match="do not load as a certificate and its key"):
        tls.user_certificates(str(first.cert), str(second.key), None)
    with pytest.raises(tls.TlsError, match="--tls-key .* is not a file"):
        tls.user_certificates(str(first.cert), str(tmp_path / "missing.pem"), None)


@pytest.mark.parametrize(
    ("argv", "https"),
    [
        ([], False),
        (["--tls"], True),
        (["--host", "10.1.2.3"], True),
        (["--host", "10.1.2.3", "--insecure-http"], False),
        (["--host", "localhost"], False),
    ],
)
def test_https_is_on_off_loopback_unless_plain_http_is_asked_for(argv, https):
    assert serve.serves_tls(serve.parse_args(argv)) is https


@pytest.mark.parametrize(
    "argv",
    [
        ["--tls-cert", "c.pem"],
        ["--tls-ca", "ca.pem"],
        ["--host", "10.1.2.3", "--insecure-http", "--tls"],
    ],
)
def test_tls_options_that_contradict_each_other_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        serve.parse_args(argv)
    assert "--tls" in capsys.readouterr().err


def test_plain_http_off_loopback_says_what_it_gives_up(tmp_path):
    from flows.stack.backing import Backing
    from flows.stack.env import Endpoints

    args = serve.parse_args(["--host", "10.1.2.3", "--insecure-http", "--mlflow-only"])
    ends = Endpoints(args.host, args.prefect_port, args.mlflow_port)
    text = serve.banner(args, ends, tmp_path, tmp_path / "credential", Backing())
    assert "WARNING      plain HTTP on 10.1.2.3 (--insecure-http)" in text
    assert "http://10.1.2.3:5000" in text
