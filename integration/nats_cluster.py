"""A private 3-server NATS cluster with JetStream on loopback, for the node-failure
scenarios.

Three ``nats-server`` processes, each with its own client and route ports and JetStream
store in a temporary directory, routed to each other (``cluster { routes: [...] }``), so
that streams with ``replicas=3`` are R3 (one leader, two followers). A test kills a
server (``kill -9``), freezes it (``SIGSTOP``/``SIGCONT``) or restarts it on the same
store; ``nats_cluster`` stops every server by PID in a ``finally``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import orjson

from integration.nats_support import answers
from integration.net import free_port

SERVER = "/usr/sbin/nats-server"


class NatsNode:
    """One server of the cluster: started, killed, frozen and restarted on its store."""

    def __init__(self, base: Path, index: int, cluster: str, sync_always: bool) -> None:
        self.index = index
        self.name = f"{cluster}-n{index}"
        self.port, self.route_port, self.http_port = free_port(), free_port(), free_port()
        self.base = base / f"n{index}"
        self.base.mkdir(parents=True)
        self.conf = self.base / "nats.conf"
        self.sync_always = sync_always
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self, cluster: str, routes: list[int]) -> None:
        route_list = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        # sync_interval (nats-server 2.10+) is what compose/ sets; 2.9 has no such key.
        sync = "  sync_interval: always\n" if self.sync_always else ""
        self.conf.write_text(
            f'server_name: "{self.name}"\nlisten: "127.0.0.1:{self.port}"\n'
            f'http: "127.0.0.1:{self.http_port}"\n'
            f'jetstream {{\n  store_dir: "{self.base / "js"}"\n  max_memory_store: 256MB\n'
            f"  max_file_store: 4GB\n{sync}}}\n"
            f'cluster {{\n  name: "{cluster}"\n  listen: "127.0.0.1:{self.route_port}"\n'
            f"  routes: [{route_list}]\n}}\n")

    def spawn(self) -> None:
        with open(self.base / "server.log", "ab") as out:
            self.proc = subprocess.Popen([SERVER, "-c", str(self.conf)], stdout=out,
                                         stderr=subprocess.STDOUT)

    def await_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not answers(self.port):
            if self.proc is None or self.proc.poll() is not None \
                    or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {self.name} did not start:\n"
                                   + self.output()[-3000:])
            time.sleep(0.05)

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "server.log").read_text(errors="replace")
        return ""

    def start(self) -> None:
        self.spawn()
        self.await_up()

    def kill(self) -> None:
        """``kill -9``: a crash, no goodbye to clients or peers."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(30)
            self.proc = None

    def freeze(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()
        self.kill()


class NatsCluster:
    """Three ``NatsNode``s routed to each other, JetStream on every one."""

    def __init__(self, size: int = 3, sync_always: bool = False) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="qtasks-natsc-"))
        self.cluster = f"qtc{uuid.uuid4().hex[:6]}"
        self.nodes = [NatsNode(self.base, i, self.cluster, sync_always) for i in range(size)]
        routes = [node.route_port for node in self.nodes]
        for node in self.nodes:
            node.write_config(self.cluster, routes)

    def url(self, **query: str) -> str:
        """``nats://h:p1,nats://h:p2,nats://h:p3?...`` naming every server."""
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return ",".join(node.url for node in self.nodes) + (f"?{tail}" if tail else "")

    def form(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.await_up()
        self.await_meta_leader(timeout)

    def await_meta_leader(self, timeout: float = 60.0, peers: int | None = None) -> None:
        """Until a JetStream meta leader is elected with ``peers`` (default: every
        server) as peers."""
        deadline = time.monotonic() + timeout
        while self.meta_leader(peers) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the NATS cluster elected no JetStream meta leader")
            time.sleep(0.1)

    def meta_leader(self, peers: int | None = None) -> str | None:
        """The server leading the JetStream meta group, once it knows ``peers`` servers
        (default: all) (monitoring ``/jsz`` of the first server that runs)."""
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.running()[0].http_port}/jsz", timeout=2) as r:
                meta = orjson.loads(r.read()).get("meta_cluster") or {}
        except OSError:
            return None
        wanted = len(self.nodes) if peers is None else peers
        if int(meta.get("cluster_size") or 0) < wanted or not meta.get("leader"):
            return None
        return str(meta["leader"])

    async def stream_leader(self, stream: str) -> NatsNode:
        """The server leading ``stream`` now."""
        name = await self.leader_of(f"$JS.API.STREAM.INFO.{stream}")
        if name is None:
            raise LookupError(f"stream {stream} has no leader now")
        return self.node_named(name)

    async def leader_of(self, api: str) -> str | None:
        """``cluster.leader`` of a JetStream API answer (account or stream info), asked
        of the first server that runs."""
        nc = await nats.connect(self.running()[0].url, connect_timeout=2,
                                allow_reconnect=False)
        try:
            reply = await nc.request(api, b"", timeout=2)
            data = orjson.loads(reply.data)
            if "error" in data:
                return None
            return (data.get("cluster") or {}).get("leader") or None
        finally:
            await nc.close()

    def running(self) -> list[NatsNode]:
        return [node for node in self.nodes if node.proc is not None]

    def node_named(self, name: str) -> NatsNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LookupError(name)

    def node_of_port(self, port: int) -> NatsNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise LookupError(port)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def nats_cluster(size: int = 3) -> Iterator[NatsCluster]:
    """A formed cluster of ``size`` servers; each stopped by PID afterwards."""
    cluster = NatsCluster(size)
    try:
        cluster.form()
        yield cluster
    finally:
        cluster.stop()
