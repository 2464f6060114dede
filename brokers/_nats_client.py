"""nats-py's client with two costs of the hot path taken out; see ``CoalescingClient``.

Both overrides work on nats-py's internal write buffer (``_pending``, ``_send_command``,
``_flush_queue``) exactly as its own ``publish`` and flusher do. nats-py is pinned below 3
for that reason, and every NATS test goes through them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
from nats.aio.client import Client


class CoalescingClient(Client):
    """nats-py's client, writing to the socket at most once per event-loop turn, with a
    cheaper publish for headers that this package writes.

    nats-py wakes its flusher on the first command after a write, and the flusher writes
    what is pending as soon as it runs: often in the same turn, before the other tasks of
    that turn have added theirs. A worker thus made several small writes (syscalls) per
    task, 31 % of its time in profiles. Waiting one turn first lets every command of the
    turn go out in one write; a command waits at most that one turn.
    """

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
        header = f"NATS/1.0\r\n{lines}\r\n".encode()  # sizes below count bytes
        command = b"".join((
            f"HPUB {subject} {reply} {len(header)} {len(header) + len(payload)}\r\n".encode(),
            header, payload, b"\r\n"))
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
            self._transport.writelines(self._pending[:])
            self._pending = []
            self._pending_data_size = 0
        await super()._send_ping(future)

    async def _flusher(self) -> None:
        while self.is_connected and not self.is_connecting:
            future: asyncio.Future[None] = await self._flush_queue.get()  # type: ignore[union-attr]
            try:
                await asyncio.sleep(0)
                if self._pending_data_size > 0:
                    self._transport.writelines(self._pending[:])  # type: ignore[union-attr]
                    self._pending = []
                    self._pending_data_size = 0
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
