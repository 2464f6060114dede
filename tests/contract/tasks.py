"""The tasks every backend's contract runs, and the gates and counters that tie a test to
the runs it starts (the worker runs in the test's process)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from qtasks import AsyncTaskExecutor, QueueTasks

#: Per-test synchronisation between a test and the tasks it runs (same process).
GATES: dict[str, asyncio.Event] = {}
CALLS: dict[str, int] = {}


def gate(token: str) -> asyncio.Event:
    return GATES.setdefault(token, asyncio.Event())


#: The ``result_ttl`` of the contract's ``short_lived`` task, in seconds.
SHORT_RESULT_TTL = 0.5


class DoublingExecutor(AsyncTaskExecutor):
    """A replacement executor that overrides ``run_task_gen`` and still streams via emit."""

    async def run_task_gen(self) -> list[Any]:
        out = []
        async for value in self.iterate():
            out.append(await self.emit(value * 2))
        return out


def register_contract_tasks(app: QueueTasks) -> None:
    from tests.contract.workflow_tasks import register_workflow_tasks

    register_workflow_tasks(app)

    async def yield_func(result: int) -> int:
        return result + 2

    @app.task(name="test_yield", generate_handler=yield_func)
    async def test_yield(n: int):  # type: ignore[no-untyped-def]
        for _ in range(n):
            n += 1
            yield n

    @app.task(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="sync_add")
    def sync_add(a: int, b: int, pause: float = 0.0) -> int:
        time.sleep(pause)  # blocking on purpose: must not stall the event loop
        return a + b

    @app.task(name="sync_gen", generate_handler=lambda v: v * 10)
    def sync_gen(n: int, pause: float = 0.0):  # type: ignore[no-untyped-def]
        for i in range(n):
            time.sleep(pause)  # blocking on purpose: must not stall the event loop
            yield i

    @app.task(name="count")
    async def count(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    @app.task(name="tight_burst")
    async def tight_burst(seconds: float, most: int):  # type: ignore[no-untyped-def]
        """Yields its own time stamps for ``seconds`` (at most ``most``), never awaiting."""
        end = time.time() + seconds
        for _ in range(most):
            now = time.time()
            if now > end:
                break
            yield now

    @app.task(name="handshake")
    async def handshake(token: str):  # type: ignore[no-untyped-def]
        yield "first"
        await gate(token).wait()  # released once the test's stream() has seen "first"
        yield "second"

    @app.task(name="record")
    async def record(token: str) -> int:
        CALLS[token] = CALLS.get(token, 0) + 1
        return CALLS[token]

    @app.task(name="held")
    async def held(token: str, value: Any = None) -> Any:
        gate(f"{token}:started").set()
        await gate(token).wait()
        return value

    @app.task(name="counted_hold")
    async def counted_hold(token: str) -> int:
        CALLS[token] = CALLS.get(token, 0) + 1
        gate(f"{token}:started").set()
        await gate(token).wait()
        return CALLS[token]

    @app.task(name="barrier")
    async def barrier(token: str, parties: int) -> int:
        CALLS[token] = CALLS.get(token, 0) + 1
        if CALLS[token] >= parties:
            gate(token).set()
        await gate(token).wait()
        return parties

    @app.task(name="fail_mid_gen")
    async def fail_mid_gen():  # type: ignore[no-untyped-def]
        yield 1
        yield 2
        raise ValueError("broken after two")

    @app.task(name="flaky", retry=2, retry_backoff=0.05)
    async def flaky(token: str, failures: int):  # type: ignore[no-untyped-def]
        CALLS[token] = CALLS.get(token, 0) + 1
        yield CALLS[token]
        if CALLS[token] <= failures:
            raise RuntimeError(f"failure {CALLS[token]}")

    @app.task(name="too_slow", max_time=0.2)
    async def too_slow() -> None:
        await asyncio.sleep(30)

    @app.task(name="too_slow_sync", max_time=0.2)
    def too_slow_sync() -> None:
        time.sleep(1.0)  # a thread cannot be interrupted: its result is dropped

    @app.task(name="unencodable_result")
    async def unencodable_result() -> object:
        return object()

    @app.task(name="doubled", executor=DoublingExecutor)
    async def doubled(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    @app.task(name="short_lived", result_ttl=SHORT_RESULT_TTL)
    async def short_lived() -> str:
        return "brief"

    @app.task(name="tagged", description="d", queue="other", tags=["a", "b"], result_ttl=60)
    async def tagged() -> str:
        return "other queue"

