"""The tasks the workflow contract composes (``tests/contract/workflows.py``), registered
with the rest of the contract's tasks. Each counts its runs in ``CALLS`` under the test's
token, so that a test can tell a step that ran twice from one that ran once."""

from __future__ import annotations

import asyncio
from typing import Any

from qtasks import QueueTasks
from tests.contract.tasks import CALLS, gate

#: How long a task waits at a gate at most: a test that never opens it fails, not hangs.
GATE_LIMIT = 20.0


def counted(token: str, label: str) -> int:
    key = f"{token}:{label}"
    CALLS[key] = CALLS.get(key, 0) + 1
    return CALLS[key]


def register_workflow_tasks(app: QueueTasks) -> None:
    @app.task(name="wf_add")
    async def wf_add(a: int, b: int = 0, token: str = "", label: str = "add") -> int:
        if token:
            counted(token, label)
        return a + b

    @app.task(name="wf_total")
    async def wf_total(values: list[int], token: str = "") -> int:
        if token:
            counted(token, "total")
        return sum(values)

    @app.task(name="wf_fail")
    async def wf_fail(value: Any, token: str) -> None:
        counted(token, "fail")
        raise ValueError(f"refused {value!r}")

    @app.task(name="wf_flaky", retry=2, retry_backoff=0.05)
    async def wf_flaky(value: int, token: str) -> int:
        if counted(token, "flaky") == 1:
            raise RuntimeError("first run fails")
        return value + 1

    @app.task(name="wf_stage")
    async def wf_stage(prefix: Any, n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield f"{prefix}{i}"

    @app.task(name="wf_chunks")
    async def wf_chunks(n: int, token: str):  # type: ignore[no-untyped-def]
        """Yields 0 … n-1; after the first yield it waits until the item of that first
        value has run: the items start while the generator still runs."""
        for i in range(n):
            yield i
            if i == 0:
                async with asyncio.timeout(GATE_LIMIT):
                    await gate(f"{token}:item0").wait()

    @app.task(name="wf_item")
    async def wf_item(value: int, token: str) -> int:
        counted(token, f"item{value}")
        gate(f"{token}:item{value}").set()
        return value * 10

    @app.task(name="wf_member")
    async def wf_member(value: int, token: str, parties: int) -> int:
        """Waits until every member of its group runs, so they finish together: the
        members then race to start what follows them."""
        if counted(token, "members") >= parties:
            gate(f"{token}:all").set()
        async with asyncio.timeout(GATE_LIMIT):
            await gate(f"{token}:all").wait()
        return value

    @app.task(name="wf_held")
    async def wf_held(value: Any, token: str) -> Any:
        counted(token, "held")
        gate(f"{token}:held").set()
        async with asyncio.timeout(GATE_LIMIT):
            await gate(token).wait()
        return value
