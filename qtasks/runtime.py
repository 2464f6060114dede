"""The runtime: what every part of one app shares once it is set up, below the app.

It holds the broker, the result store, the signer and the task registry, and does the few
things every part needs of them: connect once, seal and publish a task message within the
size limit, broadcast a cancel request, check a priority or a result TTL against what the
backends can do. The ``QueueTasks`` app builds one and declares tasks into it; the worker
and the ``Task`` handle take it. It imports neither of them, which is what keeps the core
free of import circles: app -> worker -> runtime, app -> task handle -> runtime.
"""

from __future__ import annotations

import asyncio
import time

from qtasks.control import ControlMessage
from qtasks.errors import ConfigurationError
from qtasks.interfaces import Broker, ResultStore
from qtasks.middleware import MiddlewareChain
from qtasks.protocol import TaskMessage, encode
from qtasks.schema import ExecutorClass, TaskExecSchema
from qtasks.signing import Signer


class Runtime:
    """The connections, the signer and the registered tasks of one app."""

    def __init__(self, broker: Broker, results_store: ResultStore, *,
                 executor: ExecutorClass | None, max_message_size: int,
                 default_queue: str, signer: Signer | None,
                 middleware: MiddlewareChain | None = None) -> None:
        self.broker = broker
        self.results_store = results_store
        #: The app-wide executor for tasks that name none (None: by the function's kind).
        self.executor = executor
        self.max_message_size = max_message_size
        self.default_queue = default_queue
        self.signer = signer
        #: Called around every publish here and around every attempt of a worker.
        self.middleware = middleware if middleware is not None else MiddlewareChain()
        self.registry: dict[str, TaskExecSchema] = {}
        self._started = False
        self._start_lock: asyncio.Lock | None = None

    @property
    def started(self) -> bool:
        return self._started

    def queues(self) -> list[str]:
        """Every queue a registered task uses, the default queue first."""
        names = [self.default_queue]
        names += sorted({s.queue for s in self.registry.values()} - {self.default_queue})
        return names

    async def start(self) -> None:
        """Connect the broker and the result store; idempotent. Called on first use."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            await self.broker.start()
            await self.results_store.start()
            self._started = True

    async def close(self) -> None:
        if self._started:
            await self.broker.close()
            await self.results_store.close()
            self._started = False

    async def publish(self, message: TaskMessage) -> None:
        """Encode (within the size limit), sign if a key is set, and publish a task message."""
        limit = self.max_message_size
        if self.broker.max_message_size is not None:
            limit = min(limit, self.broker.max_message_size)
        middleware = self.middleware
        if middleware:
            message.headers = dict(message.headers)  # a middleware's header is this copy's
            middleware.before_publish(message)
        await self.broker.publish(message, self.seal(encode(message, max_size=limit)))
        if middleware:
            middleware.after_publish(message)

    def seal(self, body: bytes) -> bytes:
        """Signed when a signing key is set (task messages and cancel requests alike)."""
        return body if self.signer is None else self.signer.sign(body)

    async def cancel(self, task_id: str, reason: str = "") -> None:
        """Broadcast a cancel request for ``task_id`` (see ``QueueTasks.cancel``)."""
        await self.start()
        request = ControlMessage(id=task_id, ts=time.time(), reason=reason)
        await self.broker.broadcast(self.seal(encode(request, max_size=self.max_message_size)))

    def check_priority(self, priority: int) -> None:
        """A priority the broker cannot honour is refused now, not clamped or ignored."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigurationError(
                f"priority must be an integer, not {type(priority).__name__} {priority!r}")
        if not priority:
            return
        if not self.broker.supports_priority:
            raise ConfigurationError(
                f"{type(self.broker).__name__} does not support task priorities; "
                "use separate queues instead")
        highest = self.broker.max_priority
        if priority < 0 or (highest is not None and priority > highest):
            bound = "" if highest is None else f"..{highest}"
            raise ConfigurationError(
                f"priority {priority} is outside 0{bound}, the range "
                f"{type(self.broker).__name__} orders by"
                f"{' (its max_priority option)' if highest is not None else ''}")

    def check_result_ttl(self, result_ttl: float | None) -> None:
        """A task's result cannot outlive what its store keeps: say so now, not when a
        result is missing a day later."""
        if result_ttl is None:
            return
        if result_ttl <= 0:
            raise ConfigurationError(f"result_ttl must be positive, not {result_ttl}")
        if result_ttl > self.results_store.ttl:
            raise ConfigurationError(
                f"result_ttl {result_ttl:g} s is longer than the result store keeps results "
                f"({self.results_store.ttl:g} s); raise the store's ttl (?ttl= in its URL)")
