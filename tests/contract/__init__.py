"""The backend contract: everything a Broker/ResultStore pair must do, as tests.

One suite for every backend. A backend's test module subclasses ``BackendContract`` and
overrides the ``backend`` fixture with a ``Backend`` that makes fresh connections into one
isolated namespace (``tests/test_memory_contract.py``, ``integration/test_*_contract.py``).
Producer, worker and reader are separate apps with their own connections, as they would be
in separate processes; the worker runs in this process so that tests can hold a task at a
gate and see exactly when it is where.

| module | concern |
| --- | --- |
| ``tasks`` | the tasks the contract runs; gates and counters shared with them |
| ``support`` | ``Backend``, ``running_worker``, ``Drain`` and bounded waits |
| ``producing`` | every kind of task runs; queues, delay, concurrency, priority, refused input |
| ``streaming`` | partials live to ``stream()`` and listeners, in order |
| ``results`` | ``get`` and ``watch`` from any app, result TTL |
| ``delivery`` | prefetch, requeue, redelivery, delayed retry; no task run twice |
| ``cancellation`` | cancel requests, signed or not |
| ``failures`` | task errors, time limits, retries, wait timeouts |
| ``dead_letters`` | undecodable, unknown, unsigned and forged messages; requeue |
| ``workflows`` | chain, group, chord, fan-out; copies of a continuation run once |
| ``leadership`` | ``Broker.lead``: one periodic scheduler per group, its record, takeover |
| ``ratelimit`` | a rate-limited task spaced through the broker, others not held up |
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contract.cancellation import CancellationContract
from tests.contract.dead_letters import DeadLetterContract
from tests.contract.delivery import DeliveryContract
from tests.contract.failures import FailuresContract
from tests.contract.leadership import LeadershipContract
from tests.contract.producing import ProducingContract
from tests.contract.ratelimit import RateLimitContract
from tests.contract.results import ResultsContract
from tests.contract.streaming import StreamingContract
from tests.contract.support import (
    DEADLINE,
    Backend,
    Drain,
    check_copies_join_the_run,
    heard_cancel,
    kept_dead_letters,
    publish_one,
    redeliver_with_final,
    running_worker,
    settled,
    task_message,
    three_readers,
)
from tests.contract.tasks import (
    CALLS,
    GATES,
    SHORT_RESULT_TTL,
    DoublingExecutor,
    gate,
    register_contract_tasks,
)
from tests.contract.workflows import WorkflowsContract

__all__ = [
    "CALLS",
    "DEADLINE",
    "GATES",
    "SHORT_RESULT_TTL",
    "Backend",
    "BackendContract",
    "DoublingExecutor",
    "Drain",
    "check_copies_join_the_run",
    "gate",
    "heard_cancel",
    "kept_dead_letters",
    "publish_one",
    "redeliver_with_final",
    "register_contract_tasks",
    "running_worker",
    "settled",
    "task_message",
    "three_readers",
]


class BackendContract(ProducingContract, StreamingContract, ResultsContract, DeliveryContract,
                      CancellationContract, FailuresContract, DeadLetterContract,
                    WorkflowsContract, LeadershipContract, RateLimitContract):
    """Subclass and override ``backend``."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        raise NotImplementedError("a backend's test module overrides this fixture")
        yield  # pragma: no cover
