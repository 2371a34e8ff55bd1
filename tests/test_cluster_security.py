"""Transport security on a 3-node cluster (issue 17): every check of
``test_transport_security`` against each node of a cluster whose nodes run the same TLS,
nkeys and permissions, and the routes between the nodes mutual TLS: a server that cannot
show a certificate of the installation's CA does not join the cluster (a route carries
every message and the JetStream replication).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The checks, run here against the cluster's nodes: pytest runs an imported test in this
# module, with this module's fixtures (its ``secure_servers`` and ``restart``).
import test_transport_security as single
from test_transport_security import (  # noqa: F401
    Material,
    test_a_client_that_does_not_trust_the_ca_is_refused,
    test_a_plain_connection_is_refused,
    test_a_rotated_seed_is_in_force_after_a_restart,
    test_a_service_runs_with_its_nkey_file_and_the_ca,
    test_each_user_is_refused_what_it_must_not_do,
    test_no_key_a_wrong_key_or_a_password_is_refused,
    test_project_users_still_come_from_the_callout,
    test_replies_come_to_each_users_own_inbox,
)

from lensbus.natscluster import NatsCluster
from lensbus.natsclusterconf import CLUSTER_NAME, cluster_block
from lensbus.natsserver import NatsServer
from lensbus.natstls import TlsFiles, ensure_tls

material, secured, callout = single.material, single.secured, single.callout  # fixtures


@pytest.fixture
def cluster(material: Material, tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(
        tmp_path / "cluster", 3, extra_config=material.server_config(), tls=material.tls
    ).start()
    yield c
    c.stop()


@pytest.fixture
def secure_servers(cluster: NatsCluster) -> list[NatsServer]:
    return cluster.servers


@pytest.fixture
def restart(cluster: NatsCluster) -> Callable[[NatsServer], None]:
    """A rolling restart: each node back in the cluster, JetStream current, before the next."""

    def again(server: NatsServer) -> None:
        server.stop()
        cluster.restart(cluster.servers.index(server) + 1)

    return again


def wait_for_log(server: NatsServer, wanted: str, timeout: float = 30) -> str:
    """The first line of ``server``'s log holding ``wanted`` (case-insensitive)."""
    assert server.log_file is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log_file.read_text() if server.log_file.exists() else ""
        for line in text.splitlines():
            if wanted.lower() in line.lower():
                return line
        time.sleep(0.1)
    raise AssertionError(f"{server.log_file} never said {wanted!r}:\n{text[-3000:]}")


def peers(cluster: NatsCluster, node: int) -> set[str]:
    """The servers ``node`` has routes to (nats-server opens several per peer: a pool)."""
    return {str(r.get("remote_name")) for r in cluster.monitor(node, "routez").get("routes") or []}


def intruder(tmp_path: Path, name: str, cluster: NatsCluster, tls: TlsFiles | None) -> NatsServer:
    """A server that tries to join the cluster with routes to every node."""
    block = cluster_block(CLUSTER_NAME, "127.0.0.1:-1", cluster.routes, tls)
    server = NatsServer(tmp_path / name, extra_config=block, log_file=tmp_path / f"{name}.log")
    server.server_name = name
    return server.start()


def test_the_routes_are_tls(cluster: NatsCluster) -> None:
    """The control: the three nodes did form a cluster (JetStream's meta group has three
    peers: ``start`` waited for it) over routes that are TLS."""
    for node in cluster.nodes:
        assert peers(cluster, node) == {f"n{n}" for n in cluster.nodes if n != node}
        routes = cluster.monitor(node, "varz")["cluster"]
        assert routes["tls_required"] and routes["tls_verify"], routes


def test_a_server_without_the_cas_certificate_cannot_join(
    cluster: NatsCluster, material: Material, tmp_path: Path
) -> None:
    """One intruder speaks no TLS on its routes; the other trusts the installation's CA but
    shows a certificate of its own CA. Every node hangs up on both and says why."""
    other = ensure_tls(tmp_path / "other-ca", ["localhost", "127.0.0.1"])
    forged_files = TlsFiles(material.tls.ca, other.cert, other.key)
    plain = intruder(tmp_path, "plain", cluster, None)
    forged = intruder(tmp_path, "forged", cluster, forged_files)
    try:
        for node in cluster.nodes:
            wait_for_log(cluster.server(node), "first record does not look like a TLS handshake")
            wait_for_log(cluster.server(node), "certificate signed by unknown authority")
            assert peers(cluster, node) == {f"n{n}" for n in cluster.nodes if n != node}
    finally:
        plain.stop()
        forged.stop()


def test_a_certificate_made_before_routes_used_it_is_issued_again(tmp_path: Path) -> None:
    """A server certificate for servers only (as lensbus made them before routes were TLS)
    cannot be shown on a route: the next ``ensure_tls`` issues one for both, same CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    files = ensure_tls(tmp_path, ["localhost"])
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    assert ensure_tls(tmp_path, ["localhost"]) == files
    assert files.cert.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)  # kept

    ca_key = serialization.load_pem_private_key((tmp_path / "ca-key.pem").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server_only = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca_cert.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    files.cert.write_bytes(server_only.public_bytes(serialization.Encoding.PEM))
    ensure_tls(tmp_path, ["localhost"])
    renewed = x509.load_pem_x509_certificate(files.cert.read_bytes())
    usage = renewed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    assert files.ca.read_bytes() == ca_cert.public_bytes(serialization.Encoding.PEM)
