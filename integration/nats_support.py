"""Helpers for the tests against a real NATS server: namespace cleanup, private servers
(restartable), NKeys and JWTs, and the other process of the multi-process scenarios."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import nacl.signing
import nats
import nkeys
import orjson
from nats.js.errors import NotFoundError

from integration.net import free_port
from qtasks.brokers.nats import NatsBroker
from qtasks.results.nats import NatsResultStore
from tests.contract import Backend


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


class PrivateServer:
    """A nats-server of a test's own: a free port, ``config`` (extra configuration-file
    text: authorization, max_payload ...), JetStream stored in ``directory``. A test may
    stop and start it again (``restart``) to see what a server restart does to clients;
    the server on 4222 is shared with other tests and other people, and is never
    restarted. JetStream data survives a restart, as on a real server. ``port``: another
    server's, to stand in for it while that one is stopped."""

    def __init__(self, directory: str, config: str = "", jetstream: bool = True,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.conf = os.path.join(directory, "nats.conf")
        with open(self.conf, "w") as out:
            out.write(f'listen: "127.0.0.1:{self.port}"\n{config}\n')
            if jetstream:
                out.write(f'jetstream {{ store_dir: "{os.path.join(directory, "js")}" }}\n')
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until it answers on its port."""
        proc = self.proc = subprocess.Popen(
            ["/usr/sbin/nats-server", "-c", self.conf], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not answers(self.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"private nats-server did not start ({self.conf})")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait until it is gone (JetStream data stays on disk)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout)
            self.proc = None

    async def restart(self) -> None:
        """Stop it and start it again on the same port and store (in a thread: the test's
        clients keep running on the event loop meanwhile)."""
        try:
            await asyncio.to_thread(self.stop)
        finally:
            await asyncio.to_thread(self.start)


@contextlib.contextmanager
def private_server(directory: str, config: str = "", jetstream: bool = True) -> Iterator[int]:
    """A throw-away ``PrivateServer``, stopped afterwards; yields its port."""
    server = PrivateServer(directory, config, jetstream)
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


# -- NKeys and JWTs, made here (no nsc on the machine) -------------------------------

def nkey_pair(prefix_byte: int = nkeys.PREFIX_BYTE_USER) -> tuple[bytes, str]:
    """A fresh NKey: (seed, public key), e.g. ``(b"SU...", "U...")`` for a user. The
    ``nkeys`` package reads and signs with seeds but cannot make one: the seed is a
    random Ed25519 key (PyNaCl) in the NKey encoding."""
    seed = nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), prefix_byte)
    return seed, nkeys.from_seed(bytearray(seed)).public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer_seed: bytes, subject: str, name: str, nats_claims: dict[str, object]) -> str:
    """A NATS JWT (``ed25519-nkey``) for ``subject``, signed by ``issuer_seed``."""
    issuer = nkeys.from_seed(bytearray(issuer_seed))
    claims: dict[str, object] = {
        "jti": "", "iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name,
        "sub": subject, "nats": {**nats_claims, "version": 2}}
    digest = hashlib.sha512(orjson.dumps(claims)).digest()[:32]  # unique: all the server needs
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = _b64(b'{"typ":"JWT","alg":"ed25519-nkey"}') + "." + _b64(orjson.dumps(claims))
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1, "mem_storage": -1,
              "disk_storage": -1, "streams": -1, "consumer": -1}


def operator_mode(directory: str) -> tuple[str, str]:
    """Server configuration for JWT authentication (an operator, a system account, an
    account with JetStream, its JWTs preloaded in a memory resolver) and the path of a
    ``.creds`` file, written in ``directory``, for a user of that account."""
    operator_seed, operator = nkey_pair(nkeys.PREFIX_BYTE_OPERATOR)
    _, system = nkey_pair(nkeys.PREFIX_BYTE_ACCOUNT)
    account_seed, account = nkey_pair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user = nkey_pair(nkeys.PREFIX_BYTE_USER)
    operator_jwt = _jwt(operator_seed, operator, "qtasks-op", {"type": "operator"})
    system_jwt = _jwt(operator_seed, system, "SYS", {"type": "account"})
    account_jwt = _jwt(operator_seed, account, "qtasks",
                       {"type": "account", "limits": _UNLIMITED})  # with JetStream
    config = (f'operator: "{operator_jwt}"\nsystem_account: {system}\nresolver: MEMORY\n'
              f'resolver_preload: {{ {system}: "{system_jwt}", {account}: "{account_jwt}" }}\n')
    user_jwt = _jwt(account_seed, user, "worker", {
        "type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    creds = os.path.join(directory, "worker.creds")
    with open(creds, "w") as out:
        out.write(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
                  f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n"
                  "------END USER NKEY SEED------\n")
    return config, creds


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
