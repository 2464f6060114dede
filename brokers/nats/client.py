"""nats-py's client with two costs of the hot path taken out, TLS made a requirement
rather than the server's choice, and a server's error that ends the connection handled
as a lost connection (reconnect) instead of the end of the client; see
``CoalescingClient``.

The overrides work on nats-py's internals (the write buffer ``_pending``,
``_send_command``, ``_flush_queue``; ``_process_info``, ``_process_err``,
``_process_op_err`` and ``_transport``) exactly as its own ``publish``, flusher, reader
and connect do. nats-py is pinned below 3 for that reason, and
every NATS test goes through them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.protocol.command import hpub_cmd
from nats.protocol.parser import AUTHORIZATION_VIOLATION, PERMISSIONS_ERR, STALE_CONNECTION


class PlaintextServerError(nats.errors.Error):
    """A server that does not offer TLS, met while reconnecting a client that requires
    it. A ``nats.errors.Error``, so that nats-py treats it as one failed attempt and tries
    the next server instead of ending its reconnect loop."""


class CoalescingClient(Client):
    """nats-py's client, writing to the socket at most once per event-loop turn, with a
    cheaper publish for headers that this package writes.

    nats-py wakes its flusher on the first command after a write, and the flusher writes
    what is pending as soon as it runs: often in the same turn, before the other tasks of
    that turn have added theirs. A worker thus made several small writes (syscalls) per
    task, 31 % of its time in profiles. Waiting one turn first lets every command of the
    turn go out in one write; a command waits at most that one turn.

    ``require_tls``: nats-py upgrades a connection to TLS only when the server's INFO says
    ``tls_required``, whatever the URL's scheme, so a ``tls://`` URL pointed at a plaintext
    server (a typo'd port, a server whose TLS block was dropped) would send credentials
    and every task in clear. With it set, a server that does not require TLS is refused
    after its INFO, before CONNECT, as a failed attempt (``PlaintextServerError``): nats-py
    goes on to the next server of the list, and ``plaintext_refused`` names the refused
    ones (``Connection.open`` makes that a ``ConfigurationError`` if no server was left).

    A server's ``-ERR`` on an established connection ("Maximum Payload Violation", an
    expired authentication ...) is followed by the server closing it. nats-py then closes
    the client for good: no reconnect, its subscriptions dropped, and a worker that holds
    it stays alive but never takes another task. Here it is a lost connection like any
    other: nats-py reconnects, subscribes again and reports both (``_process_err``).
    """

    #: Refuse any server that does not require TLS (set before ``connect``).
    require_tls = False

    def __init__(self) -> None:
        super().__init__()
        #: ``host:port`` of every server refused for not offering TLS.
        self.plaintext_refused: set[str] = set()

    @property
    def uses_tls(self) -> bool:
        """Whether the current connection is encrypted (an SSL object on its transport)."""
        writer = getattr(self._transport, "_io_writer", None)
        return writer is not None and writer.get_extra_info("ssl_object") is not None

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        """Called with each server's first INFO, before the TLS upgrade and CONNECT."""
        if (initial_connection and self.require_tls and not info.get("tls_required")
                and not self.options.get("tls_handshake_first")):
            server = self._current_server
            where = f"{server.uri.hostname}:{server.uri.port}" if server else "the server"
            problem = (f"NATS server {where} does not offer TLS, but TLS was asked for (a "
                       "tls:// URL or a tls_* option): refusing to connect unencrypted")
            if self._transport is not None:
                self._transport.close()  # type: ignore[no-untyped-call]  # nothing in clear
            self.plaintext_refused.add(where)
            raise PlaintextServerError(problem)
        await super()._process_info(info, initial_connection)

    async def _process_err(self, err_msg: str) -> None:
        if self.is_connecting or STALE_CONNECTION in err_msg or PERMISSIONS_ERR in err_msg:
            await super()._process_err(err_msg)  # a refused connect; a kept connection
            return
        error: nats.errors.Error = nats.errors.AuthorizationError() \
            if AUTHORIZATION_VIOLATION in err_msg else \
            nats.errors.Error(f"nats: {err_msg.strip(chr(39))}")
        self._err = error
        await self._error_cb(error)
        await self._process_op_err(error)

    async def publish_with_headers(self, subject: str, reply: str, payload: bytes,
                                   headers: dict[str, str]) -> None:
        """``publish(subject, payload, reply=reply, headers=headers)``, without nats-py's
        per-call check and clean-up of every header key and value, which was the most
        expensive step of a producer's ``add_task`` in profiles (17 % of its time). Keys
        are this package's own; a value holding a line break (a user's task id) takes
        nats-py's path, which removes it."""
        lines = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            await self.publish(subject, payload, reply=reply, headers=headers)
            return
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if len(payload) > self._max_payload:
            raise nats.errors.MaxPayloadError
        if not self.is_connected and (self._max_pending_size <= 0 or len(payload)
                                      + self._pending_data_size > self._max_pending_size):
            raise nats.errors.OutboundBufferLimitError
        header = f"NATS/1.0\r\n{lines}\r\n".encode()  # sizes count bytes, not characters
        command = hpub_cmd(subject, reply, header, payload)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += len(payload)
        await self._send_command(command)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        """nats-py writes a PING straight to the socket, ahead of commands still waiting
        in its buffer; a PONG must prove the server processed everything sent before
        (``Connection.barrier``), so the buffer goes first."""
        if self._pending_data_size > 0 and self._transport is not None and self.is_connected:
            self._write_pending()
        await super()._send_ping(future)

    def _write_pending(self) -> None:
        """Hand every buffered command to the transport, as nats-py's flusher does."""
        self._transport.writelines(self._pending[:])  # type: ignore[union-attr]
        self._pending = []
        self._pending_data_size = 0

    async def _flusher(self) -> None:
        while self.is_connected and not self.is_connecting:
            future: asyncio.Future[None] = await self._flush_queue.get()  # type: ignore[union-attr]
            try:
                await asyncio.sleep(0)
                if self._pending_data_size > 0:
                    self._write_pending()
                    await self._transport.drain()  # type: ignore[union-attr]
            except OSError as exc:
                await self._error_cb(exc)
                await self._process_op_err(exc)
                break
            except (asyncio.CancelledError, RuntimeError, AttributeError):
                break
            finally:
                if not future.done():
                    future.set_result(None)
