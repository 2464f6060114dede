"""``Broker.lead``: one periodic scheduler per group at a time; what a leader commits (ticks
and the record) reaches the queue and the next leader; a leader whose process dies loses
the turn, and its commits are refused from then on."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from qtasks import TaskStatus
from qtasks.errors import LeadershipLost
from qtasks.interfaces import Leadership
from tests.contract.support import DEADLINE, Backend, running_worker, task_message

#: The lock TTL of these tests: short, so a dead leader is replaced quickly.
TTL = 0.5


class LeadershipContract:
    async def test_one_leader_at_a_time_and_the_next_reads_the_record(
            self, backend: Backend) -> None:
        group = f"g{uuid.uuid4().hex[:8]}"
        first, second, reader = backend.app(), backend.app(), backend.app()
        await first.start()
        await second.start()
        await first.broker.declare(["default"])
        async with asyncio.timeout(DEADLINE):
            turn = await first.broker.lead(group, TTL)
        waiting = asyncio.create_task(second.broker.lead(group, TTL))
        try:
            await asyncio.sleep(3 * TTL)  # every chance to lead as well; it must not
            assert not waiting.done()
            message, body = task_message("default")
            await turn.commit([(message, body)], {"report": 1000.0, "cleanup": 990.0})
            await turn.resign()
            async with asyncio.timeout(DEADLINE):
                after: Leadership = await waiting
        finally:
            waiting.cancel()
        assert after.state == {"report": 1000.0, "cleanup": 990.0}
        await after.commit([], {"report": 1010.0, "cleanup": 990.0})
        await after.resign()
        async with running_worker(reader):
            task = await reader.task_handle(message.id, "add").wait(DEADLINE)
        assert (task.status, task.returning) == (TaskStatus.SUCCESS, 3)

    async def test_a_leader_that_dies_loses_the_turn_within_the_ttl(
            self, backend: Backend) -> None:
        group = f"g{uuid.uuid4().hex[:8]}"
        dying, standby = backend.app(), backend.app()
        await dying.start()
        await standby.start()
        async with asyncio.timeout(DEADLINE):
            turn = await dying.broker.lead(group, TTL)
        await turn.commit([], {"s": 5.0})
        waiting = asyncio.create_task(standby.broker.lead(group, TTL))
        await dying.broker.close()  # as a process that dies: no resign
        died = asyncio.get_running_loop().time()
        async with asyncio.timeout(DEADLINE):
            successor = await waiting
        # Within the TTL (and a standby's try after it); RabbitMQ at once.
        assert asyncio.get_running_loop().time() - died < 2 * TTL + 0.5
        assert successor.state == {"s": 5.0}
        with pytest.raises(LeadershipLost):
            await turn.commit([], {"s": 6.0})
        await successor.commit([], {"s": 7.0})
        await successor.resign()
