"""TLS for a stack served beyond loopback: its own certificate authority, or the user's.

On a team network the credential and every run's data cross the wire, so `flows.serve
--host <address>` serves HTTPS. Either the user gives a certificate and key
(``--tls-cert``/``--tls-key``, e.g. from the team's CA), or the stack makes its own on
first start: a CA (``ca.pem``, ``ca-key.pem``) and a server certificate for the served
address, localhost and 127.0.0.1, signed by it, all beside the credential in
``.pipeline/secrets/tls/`` with the keys 0600. A later start reuses them, and issues a new
server certificate when the address changes or the old one nears its end.

Clients trust the CA through the standard variables (``SSL_CERT_FILE`` for Python's ssl
and httpx, ``REQUESTS_CA_BUNDLE`` for requests, ``PREFECT_API_SSL_CERT_FILE`` and
``MLFLOW_TRACKING_SERVER_CERT_PATH`` for the two clients), all pointing at ``trust.pem``:
the machine's own CA bundle plus this CA, so other HTTPS (a dataset download, a bucket)
keeps working. On another host, copy ``ca.pem`` and point the same variables at it.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from flows.stack.security import SECRETS_DIR, write_secret

TLS_DIR = SECRETS_DIR / "tls"
CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate
RENEW_BEFORE_DAYS = 30
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
TRUST_ENV = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "PREFECT_API_SSL_CERT_FILE",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)


class TlsError(ValueError):
    """A certificate or key that cannot serve; the message names the file and the fix."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # the server's certificate (chain), PEM
    key: Path  # its private key, PEM, 0600
    trust: Path | None  # what clients trust: the system bundle plus our CA; None: user's cert

    def client_env(self) -> dict[str, str]:
        """The variables that make Python's ssl, httpx, requests, Prefect and MLflow
        trust the stack's certificate."""
        return {key: str(self.trust) for key in TRUST_ENV} if self.trust else {}

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.trust) if self.trust else None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _name(text: str):
    from cryptography.x509 import Name, NameAttribute
    from cryptography.x509.oid import NameOID

    return Name([NameAttribute(NameOID.COMMON_NAME, text)])


def _san(names: list[str]):
    from cryptography import x509

    entries = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _pem_cert(cert) -> str:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _issue(subject, issuer, public_key, signing_key, days: int, extensions: list):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _load_or_make_ca(folder: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_file, key_file = folder / "ca.pem", folder / "ca-key.pem"
    if cert_file.is_file() and key_file.is_file():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("gpu-train-pipeline stack CA")
    cert = _issue(
        name,
        name,
        key.public_key(),
        key,
        CA_DAYS,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
            (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        ],
    )
    write_secret(key_file, _pem_key(key))
    cert_file.write_text(_pem_cert(cert))
    return cert, key


def _server_cert_current(cert_file: Path, names: list[str], ca) -> bool:
    """Whether the server certificate there names ``names``, was signed by ``ca`` and has
    more than RENEW_BEFORE_DAYS left."""
    from cryptography import x509

    if not cert_file.is_file():
        return False
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    if cert.issuer != ca.subject:
        return False
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if left < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return {str(entry.value) for entry in san} == set(names)


def stack_certificates(project: Path, host: str) -> TlsFiles:
    """The stack's own CA and a server certificate for ``host`` (made or reused)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = project / TLS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    ca, ca_key = _load_or_make_ca(folder)
    names = list(dict.fromkeys([host, *LOOPBACK_NAMES]))
    cert_file, key_file = folder / "server.pem", folder / "server-key.pem"
    if not (_server_cert_current(cert_file, names, ca) and key_file.is_file()):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            _name(host),
            ca.subject,
            key.public_key(),
            ca_key,
            SERVER_DAYS,
            [
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (_san(names), False),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
                (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
            ],
        )
        write_secret(key_file, _pem_key(key))
        cert_file.write_text(_pem_cert(cert) + _pem_cert(ca))
    trust = folder / "trust.pem"
    system = Path(ssl.get_default_verify_paths().cafile or "")
    bundle = (system.read_text() if system.is_file() else "") + _pem_cert(ca)
    trust.write_text(bundle)
    return TlsFiles(cert_file, key_file, trust)


def user_certificates(cert: str, key: str, ca: str | None) -> TlsFiles:
    """The user's certificate and key, checked to load together before any server starts;
    ``ca``: what clients must trust when it is not a public CA's."""
    for what, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path is not None and not Path(path).is_file():
            raise TlsError(f"{what} {path} is not a file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as error:
        raise TlsError(
            f"--tls-cert {cert} and --tls-key {key} do not load as a certificate and its "
            f"key ({error}): give the PEM certificate (chain) and its unencrypted PEM key"
        ) from None
    trust = None
    if ca is not None:
        trust = Path(ca).resolve()
    return TlsFiles(Path(cert).resolve(), Path(key).resolve(), trust)
