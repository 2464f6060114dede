"""Electing the one active periodic scheduler of a group on NATS (``Broker.lead``).

Two KV buckets of the broker's prefix (``docs/nats.md``, ``docs/periodic.md``):

- ``{prefix}_beat_lock``, ``max_age`` = the lock TTL: the key ``<group>`` is the lock. A
  beat takes it with a KV *create* (atomic: it fails while the key exists) and renews it
  every ``ttl/3`` with an update on its last revision; one that dies stops renewing, the
  key expires within ``ttl``, and a standby's next create (every ``ttl/4``) wins.
- ``{prefix}_beat_state``, no age limit: the key ``<group>`` holds the record of the last
  tick enqueued per schedule (JSON), written with an update on the revision this leader
  read or wrote last: a leader that was replaced without noticing (a long pause) cannot
  write it, and learns that it lost the lead.

Ticks are published as any task, with ``Nats-Msg-Id`` = ``<tick id>:1``: a copy that a
replaced leader or its successor publishes within the stream's duplicate window (two
minutes) is dropped by JetStream. Only the broker's clock expires the lock; hosts'
clocks are never compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import nats.js.errors
import orjson
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from qtasks.brokers.nats.connection import Connection
from qtasks.brokers.nats.settings import token
from qtasks.errors import LeadershipLost
from qtasks.interfaces import Leadership
from qtasks.protocol import TaskMessage

log = logging.getLogger(__name__)

_TAKEN = (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError)


class Elections:
    """The two buckets of one broker, opened on first use."""

    def __init__(self, conn: Connection, prefix: str, replicas: int) -> None:
        self.conn = conn
        self.prefix = prefix
        self.replicas = replicas
        self._buckets: dict[str, KeyValue] = {}

    async def bucket(self, name: str, max_age: float) -> KeyValue:
        """``{prefix}_<name>`` (what ``js.create_key_value`` would make), brought to
        ``max_age`` (0: none) if it exists with another."""
        bucket = f"{self.prefix}_{name}"
        kv = self._buckets.get(f"{bucket}:{max_age}")
        if kv is not None:
            return kv
        window = min(120.0, max_age) if max_age else 120.0
        await self.conn.ensure_stream(StreamConfig(
            name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], max_age=max_age or None,
            max_msgs_per_subject=1, discard=DiscardPolicy.NEW, allow_rollup_hdrs=True,
            deny_delete=True, allow_direct=True, storage=StorageType.FILE,
            num_replicas=self.replicas, duplicate_window=window,
            description="QTasks periodic schedulers: " + (
                "the lock of each group" if max_age else "the last tick of each schedule")))
        js = self.conn.js
        kv = await self.conn.retry(f"open KV bucket {bucket}", lambda: js.key_value(bucket))
        self._buckets[f"{bucket}:{max_age}"] = kv
        return kv

    async def lead(self, group: str, ttl: float, owner: str,
                   publish: Callable[[TaskMessage, bytes], Awaitable[None]]) -> NatsLeadership:
        locks = await self.bucket("beat_lock", ttl)
        states = await self.bucket("beat_state", 0.0)
        key = token(group)
        while True:
            try:
                revision = await locks.create(key, owner.encode())
                break
            except _TAKEN:
                await asyncio.sleep(ttl / 4)  # held: try again once it may have expired
            except Exception as exc:  # a reconnect: the same, a little later
                log.info("NATS: taking the beat lock of %r failed (%s); again", group, exc)
                await asyncio.sleep(max(ttl / 4, 0.5))
        turn = NatsLeadership(locks, states, key, ttl, owner, revision, publish)
        try:
            await turn.read_state()
        except BaseException:
            await turn.resign()
            raise
        turn.start()
        return turn


class NatsLeadership(Leadership):
    """A held lock, renewed in the background until ``resign`` or until it is lost."""

    def __init__(self, locks: KeyValue, states: KeyValue, key: str, ttl: float, owner: str,
                 revision: int, publish: Callable[[TaskMessage, bytes], Awaitable[None]],
                 ) -> None:
        self.locks, self.states, self.key, self.ttl = locks, states, key, ttl
        self.owner = owner.encode()
        self.revision = revision
        self.publish = publish
        self.state = {}
        self.state_revision = 0  # 0: no record yet (then a create)
        self.lost = asyncio.Event()
        #: When the lock was last taken or renewed (this host's monotonic clock): it
        #: is ours for ``ttl`` from the request before that.
        self.renewed = time.monotonic()
        self._renewing: asyncio.Task[None] | None = None

    async def read_state(self) -> None:
        try:
            entry = await self.states.get(self.key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return
        self.state_revision = entry.revision or 0
        try:
            recorded = orjson.loads(entry.value or b"{}")
            self.state = {str(k): float(v) for k, v in recorded.items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            log.error("NATS: the beat record %r is not a JSON object of times; "
                      "starting afresh", entry.value)

    def start(self) -> None:
        self._renewing = asyncio.create_task(self._renew(), name="qtasks-beat-lock")

    def _check(self) -> None:
        if self.lost.is_set() or time.monotonic() - self.renewed > self.ttl:
            self.lost.set()
            raise LeadershipLost("the beat lock was not renewed within its TTL")

    async def _renew(self) -> None:
        """Every ``ttl/3``: renew the lock; lost when another holds it, or when no
        renewal got through for ``ttl`` (it may have expired on the server)."""
        while not self.lost.is_set():
            await asyncio.sleep(self.ttl / 3)
            asked = time.monotonic()
            try:
                self.revision = await asyncio.wait_for(
                    self.locks.update(self.key, self.owner, last=self.revision), self.ttl)
                self.renewed = asked
            except _TAKEN:
                log.warning("NATS: the beat lock %r passed to another beat", self.key)
                self.lost.set()
            except Exception as exc:
                if time.monotonic() - self.renewed > self.ttl:
                    log.warning("NATS: the beat lock %r could not be renewed within its "
                                "TTL (%s)", self.key, exc)
                    self.lost.set()

    async def commit(self, messages: Sequence[tuple[TaskMessage, bytes]],
                     state: Mapping[str, float]) -> None:
        self._check()
        for message, body in messages:
            await self.publish(message, body)  # a copy within two minutes is dropped
        self._check()
        record = orjson.dumps(dict(state))
        try:
            if self.state_revision:
                self.state_revision = await self.states.update(self.key, record,
                                                               last=self.state_revision)
            else:
                self.state_revision = await self.states.create(self.key, record)
        except _TAKEN:
            self.lost.set()
            raise LeadershipLost("another beat recorded ticks since this one led") from None
        self.state = dict(state)

    async def resign(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewing
            self._renewing = None
        if not self.lost.is_set():
            self.lost.set()
            # Deleted only if still ours: a standby then takes it at its next try.
            with contextlib.suppress(Exception):
                await self.locks.delete(self.key, last=self.revision)
