"""TLS for NATS client connections: a local CA and nats-server's certificate.

``lensbus up`` (its data folder's ``tls/``) and ``python -m lensbus.natsauth compose-setup``
(compose's secrets folder) make them once and keep them:

- ``ca.pem``: the CA's certificate, public: every service and program verifies the server
  with it (``nats_tls_ca``, ``--tls-ca``, ``Client(tls_ca=...)``);
- ``ca-key.pem`` (0600): the CA's key, only used to issue the next server certificate;
- ``server.pem`` and ``server-key.pem`` (0600): nats-server's ``tls {}``, for the names
  clients reach it by (``localhost``, ``127.0.0.1``, this host's name; compose adds ``nats``).

The server certificate (also the one a cluster's nodes show each other on their routes:
:mod:`lensbus.natsclusterconf`) is issued again when it comes within :data:`RENEW_DAYS` of
its end, lacks one of the names asked for or the client usage routes need, or was not signed
by the CA in the folder; a new CA comes only when its files are missing (``rotate_ca``: then
every client needs the new ``ca.pem``).
Keys are ECDSA P-256: made in milliseconds, and every TLS stack nats-server and Python use
takes them. ``cryptography`` (the ``server`` extra) is imported only when something is made.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lensbus.natsserver import write_private

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a leaf certificate; renewed well before
RENEW_DAYS = 30
# nats-server's default TLS handshake timeout is 0.5 s: a Python client on a busy 2-core box
# can take longer (seen in the tests), and a refused handshake reads like a dead server.
HANDSHAKE_TIMEOUT_S = 5.0

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server.pem", "server-key.pem"


class TlsError(ValueError):
    """A certificate or key that cannot be used, with the file named."""


@dataclass(frozen=True)
class TlsFiles:
    """The CA clients trust and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        folder = Path(folder)
        return cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)


def default_names() -> list[str]:
    """The names a local server answers to: loopback and this host's names."""
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    for name in (host, socket.getfqdn(host)):
        if name and name not in names:
            names.append(name)
    return names


def server_block(files: TlsFiles, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    """nats-server config text: clients must speak TLS with this certificate."""
    return (
        "tls {\n"
        f'  cert_file: "{files.cert}"\n'
        f'  key_file: "{files.key}"\n'
        f"  timeout: {timeout_s:g}\n"
        "}\n"
    )


def ensure_tls(folder: Path, names: Iterable[str], private_certs: bool = False) -> TlsFiles:
    """The CA and a server certificate for ``names`` in ``folder`` (0700), made or renewed as
    needed (module docstring). ``private_certs``: the certificates 0600 too (else 0644: a
    container's user must read ``ca.pem``; the folder keeps other users out)."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TlsFiles.in_folder(folder)
    wanted = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not wanted:
        raise TlsError("a server certificate needs at least one name")
    ca_key, ca_cert = _ca(folder, private_certs)
    if not _server_ok(files.cert, ca_cert, wanted):
        key = _new_key()
        cert = _server_cert(key, wanted, ca_key, ca_cert)
        write_private(files.key, _key_pem(key))
        _write_cert(files.cert, cert, private_certs)
    return files


def rotate_ca(folder: Path) -> None:
    """Forget the CA and the server certificate: :func:`ensure_tls` makes new ones."""
    for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY):
        (Path(folder) / name).unlink(missing_ok=True)


def rotate_server(folder: Path) -> None:
    """Forget the server certificate (the CA stays): a new key and certificate next time."""
    for name in (SERVER_CERT, SERVER_KEY):
        (Path(folder) / name).unlink(missing_ok=True)


# ---- making them ----------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lensbus"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> Any:
    from cryptography import x509

    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _server_cert(
    key: ec.EllipticCurvePrivateKey,
    names: list[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    return (
        _builder(_name("lensbus nats-server"), key, SERVER_DAYS)
        .issuer_name(ca_cert.subject)
        .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # client too: a cluster's nodes show it to each other on their routes
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _general_names(names: list[str]) -> list[Any]:
    from cryptography import x509

    out: list[Any] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _ca(folder: Path, private_certs: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The folder's CA (key, certificate), made when either file is missing."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    if cert_path.is_file() and key_path.is_file():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise TlsError(f"{folder}: unreadable CA ({exc}); rotate it") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TlsError(f"{key_path}: not an EC key; rotate the CA")
        return key, cert
    key = _new_key()
    subject = _name("lensbus local CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(subject, key, CA_DAYS)
        .issuer_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    _write_cert(cert_path, cert, private_certs)
    (folder / SERVER_CERT).unlink(missing_ok=True)  # signed by the CA that is gone
    return key, cert


def _server_ok(path: Path, ca_cert: x509.Certificate, names: list[str]) -> bool:
    """Whether the server certificate at ``path`` can stay: signed by ``ca_cert``, far from
    its end, valid for every name in ``names`` and usable on a route too."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not path.is_file() or not path.with_name(SERVER_KEY).is_file():
        return False
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, x509.ExtensionNotFound):
        return False
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:  # made before routes used it
        return False
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=RENEW_DAYS):
        return False
    have = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    return all(str(_normal(n)) in have for n in names)


def _normal(name: str) -> object:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return name


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _write_cert(path: Path, cert: x509.Certificate, private: bool) -> None:
    from cryptography.hazmat.primitives import serialization

    write_private(path, cert.public_bytes(serialization.Encoding.PEM).decode())
    if not private:
        os.chmod(path, 0o644)  # public; the folder (0700) keeps other host users out
