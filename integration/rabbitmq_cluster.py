"""A private 3-node RabbitMQ cluster on loopback, for the node-failure scenarios.

Each node is a ``rabbitmq-server`` of its own (name, AMQP and distribution ports, data and
log directories in a temporary directory, no management plugin, a small Raft WAL and
memory watermark so that three fit a small machine). The second and third join the
first with ``rabbitmqctl join_cluster``. A test kills a node (``kill -9`` of its Erlang
VM, found by PID), freezes it (``SIGSTOP``/``SIGCONT``) or restarts it on the same data;
``rabbit_cluster`` stops every node by PID in a ``finally``, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from integration.net import free_port, reachable

#: Per node: the Raft WAL rolls over at 8 MiB (default 512 MiB, kept in memory), and the
#: memory alarm is at 1 GiB (default 40 % of the machine's memory, for each node).
NODE_CONFIG = """\
raft.wal_max_size_bytes = 8388608
vm_memory_high_watermark.absolute = 1GiB
disk_free_limit.absolute = 50MB
"""


def _ctl(node: str, *args: str, timeout: float = 120.0, check: bool = True,
         ) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        raise RuntimeError("rabbitmqctl is not on PATH")
    return subprocess.run([tool, "-n", node, *args], capture_output=True, text=True,
                          timeout=timeout, check=check)


class ClusterNode:
    """One node: started, killed, frozen and restarted on the same name, ports and data."""

    def __init__(self, base: Path, index: int) -> None:
        self.index = index
        self.name = f"qtc{uuid.uuid4().hex[:6]}n{index}@localhost"
        self.port, self.dist_port = free_port(), free_port()
        self.base = base / f"node{index}"
        self.proc: subprocess.Popen[bytes] | None = None
        #: The OS process id of the node's Erlang VM (beam.smp), once started.
        self.pid: int | None = None
        self._write_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_files(self) -> None:
        base = self.base
        base.mkdir(parents=True)
        base.chmod(0o755)
        for sub in ("mnesia", "log"):
            (base / sub).mkdir()
        if os.geteuid() == 0:  # rabbitmq-server runs as the rabbitmq user then
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam("rabbitmq")
                for sub in ("mnesia", "log"):
                    os.chown(base / sub, user.pw_uid, user.pw_gid)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "distribution.listener.interface = 127.0.0.1\n"
            f"distribution.listener.port_range.min = {self.dist_port}\n"
            f"distribution.listener.port_range.max = {self.dist_port}\n"
            "loopback_users = none\n" + NODE_CONFIG)
        (base / "env.conf").write_text(
            f"NODENAME={self.name}\nNODE_PORT={self.port}\nDIST_PORT={self.dist_port}\n"
            f"MNESIA_BASE={base / 'mnesia'}\nLOG_BASE={base / 'log'}\n"
            f"CONFIG_FILE={base / 'rabbitmq.conf'}\n"
            f"ENABLED_PLUGINS_FILE={base / 'enabled_plugins'}\nERL_EPMD_ADDRESS=127.0.0.1\n")
        for path in base.iterdir():
            if path.is_file():
                path.chmod(0o644)

    def spawn(self) -> None:
        """Start ``rabbitmq-server`` (without waiting for it)."""
        server = shutil.which("rabbitmq-server")
        if server is None:
            raise RuntimeError("rabbitmq-server is not on PATH")
        env = {**os.environ, "RABBITMQ_CONF_ENV_FILE": str(self.base / "env.conf")}
        with open(self.base / "server.out", "ab") as out:
            self.proc = subprocess.Popen([server], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=self.base)
        self.pid = None

    def await_booted(self, timeout: float = 180.0) -> None:
        """Until the node has booted and its AMQP port answers; learns its VM's PID."""
        deadline = time.monotonic() + timeout
        while not reachable(self.port):
            if (self.proc is not None and self.proc.poll() is not None) \
                    or time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.name} did not start:\n"
                                   + self.output()[-3000:])
            time.sleep(0.2)
        _ctl(self.name, "await_startup", timeout=max(5.0, deadline - time.monotonic()))
        out = _ctl(self.name, "eval", "os:getpid().").stdout
        found = re.search(r"(\d+)", out)
        if found is None:
            raise RuntimeError(f"no OS pid from {self.name}: {out!r}")
        self.pid = int(found.group(1))

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "server.out").read_text(errors="replace")
        return ""

    def start(self, timeout: float = 180.0) -> None:
        self.spawn()
        self.await_booted(timeout)

    def kill(self) -> None:
        """``kill -9`` of the node's Erlang VM (a crash: no goodbye to clients or peers)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(self.pid)
        self._reap()

    def freeze(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Gone, whatever state it is in: its VM and the processes started with it are
        killed by PID (the data directory stays, for ``start`` again)."""
        self.thaw()
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(self.pid)
        self._reap()
        self.pid = None

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)

    @staticmethod
    def _wait_gone(pid: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


class RabbitCluster:
    """Three ``ClusterNode``s joined into one cluster."""

    def __init__(self, size: int = 3) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="qtasks-rmqc-"))
        self.base.chmod(0o755)
        self.nodes = [ClusterNode(self.base, i) for i in range(size)]

    def url(self, **query: str) -> str:
        """``amqp://guest:guest@h1:p1,h2:p2,h3:p3/`` naming every node."""
        hosts = ",".join(node.address for node in self.nodes)
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"amqp://guest:guest@{hosts}/" + (f"?{tail}" if tail else "")

    def form(self) -> None:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.await_booted()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            _ctl(node.name, "stop_app")
            _ctl(node.name, "join_cluster", first.name)
            _ctl(node.name, "start_app")
        for node in self.nodes:
            _ctl(node.name, "await_startup")
        out = _ctl(first.name, "cluster_status", "--formatter", "json").stdout
        for node in self.nodes:
            if node.name not in out:
                raise RuntimeError(f"{node.name} is not in the cluster: {out}")

    def running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.pid is not None]

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl`` on a node that runs."""
        return _ctl(self.running()[0].name, *args, timeout=timeout).stdout

    def node_of_pid(self, erlang_pid: str) -> ClusterNode:
        for node in self.nodes:
            if node.name.split("@")[0] in erlang_pid:
                return node
        raise LookupError(erlang_pid)

    def queue_leader(self, queue: str) -> ClusterNode:
        """The node that leads a quorum queue or stream (``list_queues leader``)."""
        out = self.ctl("list_queues", "name", "leader", "--quiet", "--no-table-headers")
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 2 and fields[0] == queue:
                return self.node_named(fields[1].strip())
        raise LookupError(f"no queue {queue!r} in {out!r}")

    def node_named(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LookupError(name)

    def node_of_connection(self, connection_name: str) -> ClusterNode:
        """The node a client's connection (named ``connection_name``...) is on."""
        out = self.ctl("list_connections", "port", "client_properties", "--quiet",
                       "--no-table-headers")
        for line in out.splitlines():
            if f'"{connection_name}' in line:
                port = int(line.split("\t")[0])
                return next(node for node in self.nodes if node.port == port)
        raise LookupError(connection_name)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def rabbit_cluster(size: int = 3) -> Iterator[RabbitCluster]:
    """A cluster of ``size`` nodes, formed; every node stopped by PID afterwards."""
    cluster = RabbitCluster(size)
    try:
        cluster.form()
        yield cluster
    finally:
        cluster.stop()
