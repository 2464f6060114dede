"""Helpers for the tests against a real NATS server: namespace cleanup, server restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import nats
import orjson
from nats.js.errors import NotFoundError

from brokers.nats import NatsBroker
from integration.net import free_port
from results.nats import NatsResultStore
from tests.contract import Backend

NATS_START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec",
    "/usr/sbin/nats-server", "--", "-a", "127.0.0.1", "-p", "4222", "-js", "-sd",
    "/var/lib/nats-server", "-l", "/var/log/nats-server.log",
]


async def delete_namespace(url: str, prefix: str) -> list[str]:
    """Delete every stream (with its consumers) and KV bucket whose name derives from
    ``prefix``; returns the names deleted."""
    nc = await nats.connect(url.split("?")[0], connect_timeout=5, max_reconnect_attempts=5)
    deleted = []
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith(f"{prefix}_") or name.startswith(f"KV_{prefix}_"):
                try:
                    await js.delete_stream(name)
                    deleted.append(name)
                except NotFoundError:
                    pass
    finally:
        await nc.close()
    return deleted


@contextlib.asynccontextmanager
async def open_backend(url: str, prefix: str) -> AsyncIterator[Backend]:
    """NATS broker and results under ``prefix``; its apps closed and its streams, consumers
    and buckets deleted afterwards."""
    backend = Backend(broker=lambda: NatsBroker(url, prefix=prefix),
                      results=lambda: NatsResultStore(url, prefix=prefix))
    try:
        yield backend
    finally:
        await backend.close()
        await delete_namespace(url, prefix)


def delete_namespace_sync(url: str, prefix: str) -> None:
    """``delete_namespace`` for synchronous fixtures."""
    asyncio.run(delete_namespace(url, prefix))


async def stream_names(url: str, prefix: str) -> list[str]:
    nc = await nats.connect(url.split("?")[0], connect_timeout=5)
    try:
        return sorted(info.config.name or "" for info in await nc.jetstream().streams_info()
                      if (info.config.name or "").startswith((f"{prefix}_", f"KV_{prefix}_")))
    finally:
        await nc.close()


def answers(port: int = 4222) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.settimeout(1)
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


def server_pids() -> list[int]:
    """The shared server on 4222 only, not a test's private server (``private_server``)."""
    found = subprocess.run(["pgrep", "-f", "nats-server -a 127.0.0.1 -p 4222"],
                           capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def stop_server(timeout: float = 20.0) -> None:
    """SIGTERM the server and wait until it is gone (JetStream data stays on disk)."""
    pids = server_pids()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nats-server {pids} did not stop within {timeout} s")
        time.sleep(0.05)


def start_server(timeout: float = 30.0) -> None:
    """Start the server if it is down and wait until it answers on 4222."""
    subprocess.run(NATS_START, check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while not answers():
        if time.monotonic() > deadline:
            raise RuntimeError(f"nats-server did not answer on 4222 within {timeout} s")
        time.sleep(0.05)


async def restart_server() -> None:
    """Stop the server and start it again; whatever happens, it runs and answers again
    before this returns (other tests share it)."""
    try:
        await asyncio.to_thread(stop_server)
    finally:
        await asyncio.to_thread(start_server)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def private_server(directory: str, config: str = "", jetstream: bool = True) -> Iterator[int]:
    """A throw-away nats-server with JetStream on a free port (``config`` is extra
    configuration-file text: authorization, max_payload ...); yields its port."""
    port = free_port()
    conf = os.path.join(directory, "nats.conf")
    with open(conf, "w") as out:
        out.write(f'listen: "127.0.0.1:{port}"\n{config}\n')
        if jetstream:
            out.write(f'jetstream {{ store_dir: "{os.path.join(directory, "js")}" }}\n')
    proc = subprocess.Popen(["/usr/sbin/nats-server", "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private nats-server did not start ({conf})")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(20)


class Child:
    """``python -m integration.nats_support ...`` in another process; lines on demand."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "integration.nats_support", *args], cwd=root,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.seen.append(line)
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 20.0) -> str:
        """The next line printed by the child, skipping its log lines."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"child printed nothing within {timeout} s:\n"
                                     + "".join(self.seen)) from None
            if line == "READY" or line.startswith("{"):
                return line

    def json(self, timeout: float = 20.0) -> dict[str, object]:
        data = orjson.loads(self.line(timeout))
        assert isinstance(data, dict)
        return data

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# -- the other process of the multi-process scenarios ---------------------------------
#
#   python -m integration.nats_support listen <task>   one JSON line per event, as received
#   python -m integration.nats_support read <task_id>  get() then watch(), as JSON lines
#
# Both use QTASKS_BROKER_URL / QTASKS_RESULTS_URL like the workers, and print READY once
# subscribed.


async def _listen(task_name: str, count: int) -> None:
    from qtasks import QueueTasks

    app = QueueTasks(embedded_worker=False)
    events = await app.subscribe(task_name)
    print("READY", flush=True)
    finals = 0
    async for event in events:
        print(orjson.dumps({"received": time.time(), **event.to_dict()}).decode(), flush=True)
        finals += event.kind == "final"
        if finals >= count:
            break
    await app.close()


async def _read(task_id: str) -> None:
    from qtasks import QueueTasks

    app = QueueTasks(embedded_worker=False)
    found = await app.get(task_id)
    print(orjson.dumps({"get": None if found is None else {
        "status": found.status.value, "name": found.name, "returning": found.returning,
        "worker": found.worker}}).decode(), flush=True)
    handle = app.task_handle(task_id)
    values = [value async for value in handle.stream()]
    print(orjson.dumps({"stream": values, "status": handle.status.value,
                        "returning": handle.returning}).decode(), flush=True)
    await app.close()


def main(argv: list[str]) -> None:
    command, argument = argv[0], argv[1]
    if command == "listen":
        asyncio.run(_listen(argument, int(argv[2]) if len(argv) > 2 else 1))
    elif command == "read":
        asyncio.run(_read(argument))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
