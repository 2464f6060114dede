"""A private RabbitMQ node: its own name, ports, data and configuration.

The shared RabbitMQ on 127.0.0.1:5672 cannot be reconfigured (a TLS listener, a short
``consumer_timeout``) without restarting a broker other tests use; so such tests start a
node of their own, wait until its port answers, and stop it afterwards, whatever happened.
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
class RabbitNode:
    name: str
    tcp_port: int

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.tcp_port}/"


def node_directory() -> Path:
    """A directory for a node, to write files its configuration names (certificates)
    before ``private_rabbitmq(base=...)`` starts it there."""
    base = Path(tempfile.mkdtemp(prefix="qtasks-node-"))
    base.chmod(0o755)
    return base


@contextlib.contextmanager
def private_rabbitmq(config: str = "", advanced: str = "", wait_port: int | None = None,
                     base: Path | None = None,
                     timeout: float = 120.0) -> Iterator[RabbitNode]:
    """A node with a TCP listener on a free port plus ``config`` (``rabbitmq.conf`` lines)
    and ``advanced`` (an ``advanced.config`` term), yielded once ``wait_port`` (default:
    its TCP port) answers; stopped and deleted afterwards. Needs ``rabbitmq-server``; when
    run as root, the node runs as the ``rabbitmq`` user (as ``rabbitmq-server`` arranges),
    so its directory is made readable to it."""
    server = shutil.which("rabbitmq-server")
    if server is None:
        raise RuntimeError("rabbitmq-server is not on PATH")
    base = base or node_directory()
    name = f"qt{uuid.uuid4().hex[:8]}@localhost"
    tcp_port, dist_port = free_port(), free_port()
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
        "distribution.listener.interface = 127.0.0.1\n"
        f"distribution.listener.port_range.min = {dist_port}\n"
        f"distribution.listener.port_range.max = {dist_port}\n" + config)
    env_lines = (
        # DIST_PORT given: the default, NODE_PORT + 20000, is out of range for a port
        # from the ephemeral range.
        f"NODENAME={name}\nNODE_PORT={tcp_port}\nDIST_PORT={dist_port}\n"
        f"MNESIA_BASE={base / 'mnesia'}\n"
        f"LOG_BASE={base / 'log'}\nCONFIG_FILE={base / 'rabbitmq.conf'}\n"
        f"ENABLED_PLUGINS_FILE={base / 'enabled_plugins'}\nERL_EPMD_ADDRESS=127.0.0.1\n")
    if advanced:
        (base / "advanced.config").write_text(advanced)
        env_lines += f"ADVANCED_CONFIG_FILE={base / 'advanced.config'}\n"
    (base / "env.conf").write_text(env_lines)
    for path in base.iterdir():
        if path.is_file():
            path.chmod(0o644)
    env = {**os.environ, "RABBITMQ_CONF_ENV_FILE": str(base / "env.conf")}
    with open(base / "server.out", "wb") as out:
        proc = subprocess.Popen([server], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=base)
    try:
        deadline = time.monotonic() + timeout
        while not reachable(wait_port or tcp_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = (base / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the private RabbitMQ node did not start:\n{output}")
            time.sleep(0.2)
        yield RabbitNode(name, tcp_port)
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["rabbitmqctl", "-n", name, "stop"], capture_output=True,
                           timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)
