"""Throw-away TLS material, and a private RabbitMQ node with a TLS listener (the shared
one on 127.0.0.1:5672 has none)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from integration.net import free_port
from integration.rabbitmq_node import node_directory, private_rabbitmq


@dataclass(frozen=True)
class Certificates:
    """Paths of a CA, a server certificate for 127.0.0.1/localhost and a client one."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def certificates(directory: Path) -> Certificates:
    """Make a CA and two certificates it signed (EC P-256, one day) with ``openssl``."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=qtasks test CA")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for role in ("server", "client"):
        run("req", *ec, "-keyout", f"{role}.key", "-out", f"{role}.csr",
            "-subj", f"/CN=qtasks test {role}")
        run("x509", "-req", "-in", f"{role}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{role}.pem", "-days", "1",
            "-extfile", f"{role}.ext")
    for path in directory.iterdir():
        path.chmod(0o644)  # the broker runs as its own user
    return Certificates(*(str(directory / name) for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key")))


@dataclass(frozen=True)
class TlsNode:
    name: str
    tls_port: int
    certs: Certificates


@contextlib.contextmanager
def private_rabbitmq_tls(timeout: float = 120.0) -> Iterator[TlsNode]:
    """A RabbitMQ node whose TLS listener requires a client certificate signed by a
    throw-away CA. Needs ``rabbitmq-server`` and ``openssl``."""
    base = node_directory()
    certs = certificates(base)
    tls_port = free_port()
    config = (f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
              f"ssl_options.cacertfile = {certs.ca}\n"
              f"ssl_options.certfile = {certs.server_cert}\n"
              f"ssl_options.keyfile = {certs.server_key}\n"
              "ssl_options.verify = verify_peer\n"
              "ssl_options.fail_if_no_peer_cert = true\n")
    with private_rabbitmq(config, wait_port=tls_port, base=base, timeout=timeout) as node:
        yield TlsNode(node.name, tls_port, certs)
