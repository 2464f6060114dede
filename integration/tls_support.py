"""Throw-away TLS material and a private RabbitMQ node with a TLS listener.

The shared RabbitMQ on 127.0.0.1:5672 has no TLS listener, and reconfiguring it would
restart a broker other tests use; so the TLS tests start a node of their own (its own
name, ports, data and configuration), wait until its TLS port answers, and stop it
afterwards, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from integration.net import free_port, reachable


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
    throw-away CA. Needs ``rabbitmq-server`` and ``openssl``; when run as root, the node
    runs as the ``rabbitmq`` user (as ``rabbitmq-server`` arranges), so its directory is
    made readable to it."""
    server = shutil.which("rabbitmq-server")
    if server is None:
        raise RuntimeError("rabbitmq-server is not on PATH")
    base = Path(tempfile.mkdtemp(prefix="qtasks-tls-node-"))
    base.chmod(0o755)
    certs = certificates(base)
    name = f"qt{uuid.uuid4().hex[:8]}@localhost"
    tcp_port, tls_port, dist_port = free_port(), free_port(), free_port()
    for sub in ("mnesia", "log"):
        (base / sub).mkdir()
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("rabbitmq")
            for sub in ("mnesia", "log"):
                os.chown(base / sub, user.pw_uid, user.pw_gid)
    (base / "enabled_plugins").write_text("[].\n")  # no management UI: no port clash
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{tcp_port}\n"
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {certs.ca}\n"
        f"ssl_options.certfile = {certs.server_cert}\n"
        f"ssl_options.keyfile = {certs.server_key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
        "distribution.listener.interface = 127.0.0.1\n"
        f"distribution.listener.port_range.min = {dist_port}\n"
        f"distribution.listener.port_range.max = {dist_port}\n")
    (base / "env.conf").write_text(
        # DIST_PORT given: the default, NODE_PORT + 20000, is out of range for a port
        # from the ephemeral range.
        f"NODENAME={name}\nNODE_PORT={tcp_port}\nDIST_PORT={dist_port}\n"
        f"MNESIA_BASE={base / 'mnesia'}\n"
        f"LOG_BASE={base / 'log'}\nCONFIG_FILE={base / 'rabbitmq.conf'}\n"
        f"ENABLED_PLUGINS_FILE={base / 'enabled_plugins'}\nERL_EPMD_ADDRESS=127.0.0.1\n")
    for path in base.iterdir():
        if path.is_file():
            path.chmod(0o644)
    env = {**os.environ, "RABBITMQ_CONF_ENV_FILE": str(base / "env.conf")}
    with open(base / "server.out", "wb") as out:
        proc = subprocess.Popen([server], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=base)
    try:
        deadline = time.monotonic() + timeout
        while not reachable(tls_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = (base / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the private RabbitMQ node did not start:\n{output}")
            time.sleep(0.2)
        yield TlsNode(name, tls_port, certs)
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["rabbitmqctl", "-n", name, "stop"], capture_output=True,
                           timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)
