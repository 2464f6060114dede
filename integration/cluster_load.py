"""Load on a 3-node cluster while a node fails, and the verdicts on what came out.

``run_load`` submits streaming tasks (``countdown`` of integration/apps.py) from one
producer app, a bounded number in flight, to CLI workers; for each it follows the
partial stream and ``wait()`` at once, as a service does. When a share of them has
finished, it runs the fault (kill a node, freeze it ...) while the load goes on. The
figures it returns (the longest time without any task finishing, the slowest submit,
duplicate runs from the workers' one line per finished task) are printed by the tests
and checked by ``check_verdicts``:

- every confirmed task (``add_task`` returned) has exactly one successful final,
  readable by id (``get``) from another app;
- every partial stream is complete and in order;
- every producer's ``wait()`` resolved, with the success;
- the workers, never restarted, finished tasks after the fault.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from integration.processes import WorkerProcess
from qtasks import QueueTasks, TaskStatus

#: Tasks per scenario (``QTASKS_CLUSTER_TASKS``), values each task yields, and the pause
#: between yields: a task streams for about YIELDS * PAUSE seconds.
TASKS = int(os.environ.get("QTASKS_CLUSTER_TASKS", "1000"))
YIELDS = 5
PAUSE = 0.02
#: Tasks in flight from the producer at once, and submitted per second.
IN_FLIGHT = 40
RATE = float(os.environ.get("QTASKS_CLUSTER_RATE", "60"))
#: Tasks submitted at a time once the fault is over, until every worker has finished
#: some (within ``RECOVERY_DEADLINE`` seconds).
TAIL = 2 * IN_FLIGHT
RECOVERY_DEADLINE = 90.0
#: ``get`` calls the verdicts make at once (as many services would).
GETS_AT_ONCE = 50
#: Bound of one task from submit to final, outage included.
TASK_DEADLINE = 120.0
_FINISHED = re.compile(r"countdown (\S+) (\w+) in ")


@dataclass
class Record:
    """One task as the producer saw it."""

    index: int
    id: str = ""
    submitted: float = 0.0
    confirmed: float = 0.0
    finished: float = 0.0
    values: list[object] = field(default_factory=list)
    status: TaskStatus | None = None
    error: str = ""


@dataclass
class Figures:
    tasks: int
    elapsed: float
    #: Longest time, from the fault on, in which no task finished (producer's view).
    stall: float
    #: Slowest ``add_task`` (submit to broker confirm).
    slowest_submit: float
    #: Task runs beyond the first, from the workers' lines (a redelivery runs it again).
    duplicates: int
    fault_at: float
    fault_took: float
    records: list[Record]
    #: Each worker's finished tasks before the tail, submitted once the fault was over.
    before_tail: list[int]
    #: Seconds from the end of the fault until every worker had finished a tail task.
    recovery: float

    def line(self, name: str) -> str:
        return (f"[cluster] {name}: {self.tasks} tasks in {self.elapsed:.1f} s; stall "
                f"{self.stall:.2f} s; slowest submit {self.slowest_submit:.2f} s; "
                f"duplicate runs {self.duplicates}; fault took {self.fault_took:.1f} s; "
                f"every worker working again {self.recovery:.1f} s after it")


async def _one(app: QueueTasks, record: Record) -> None:
    record.submitted = time.monotonic()
    try:
        task = await app.add_task("countdown", YIELDS, PAUSE)
        record.id = task.id
        record.confirmed = time.monotonic()

        async def stream() -> None:
            record.values = [value async for value in task.stream()]

        async with asyncio.timeout(TASK_DEADLINE):
            done, _ = await asyncio.gather(task.wait(), stream())
        record.status = done.status
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    record.finished = time.monotonic()


async def run_load(app: QueueTasks, fault: Callable[[], Awaitable[None]],
                   workers: list[WorkerProcess], tasks: int = TASKS,
                   fault_after: float = 0.25) -> Figures:
    """Tasks submitted at ``RATE`` a second (at most ``IN_FLIGHT`` unfinished), at least
    ``tasks`` of them and on until the fault is over, so that the load spans the whole
    fault; ``fault`` starts once ``fault_after`` of ``tasks`` have finished. Then tails
    of ``TAIL`` more until each worker has finished some (recovered, not restarted)."""
    records: list[Record] = []
    slots = asyncio.Semaphore(IN_FLIGHT)
    finished = 0
    trigger = asyncio.Event()
    started = time.monotonic()

    async def one(record: Record) -> None:
        nonlocal finished
        async with slots:
            await _one(app, record)
        finished += 1
        if finished >= tasks * fault_after:
            trigger.set()

    async def faulting() -> tuple[float, float]:
        await trigger.wait()
        at = time.monotonic()
        await fault()
        return at, time.monotonic() - at

    fault_task = asyncio.ensure_future(faulting())
    running: list[asyncio.Future[None]] = []
    try:
        while len(records) < tasks or not fault_task.done():
            await asyncio.sleep(max(0.0, started + len(records) / RATE - time.monotonic()))
            await slots.acquire()  # submit no faster than tasks finish
            slots.release()
            records.append(Record(len(records)))
            running.append(asyncio.ensure_future(one(records[-1])))
        await asyncio.gather(*running)
        fault_at, fault_took = fault_task.result()
    finally:
        fault_task.cancel()
        for future in running:
            future.cancel()
    loaded = len(records)
    before_tail = [finished_lines(worker) for worker in workers]
    # The tail: batches until every worker has finished some of them (or the deadline).
    recovered = time.monotonic()
    while time.monotonic() - recovered < RECOVERY_DEADLINE:
        tail = [Record(len(records) + i) for i in range(TAIL)]
        await asyncio.gather(*(one(r) for r in tail))
        records += tail
        if all(finished_lines(w) > n for w, n in zip(workers, before_tail, strict=True)):
            break
    recovery = time.monotonic() - recovered
    elapsed = time.monotonic() - started
    # Over the load the fault hit (the tail starts once the fault is over).
    ends = sorted(r.finished for r in records[:loaded] if r.finished >= fault_at)
    stall = max((b - a for a, b in itertools.pairwise([fault_at, *ends])), default=0.0)
    submits = [r.confirmed - r.submitted for r in records if r.confirmed]
    return Figures(len(records), elapsed, stall, max(submits, default=0.0),
                   duplicate_runs(workers), fault_at, fault_took, records, before_tail,
                   recovery)


def duplicate_runs(workers: list[WorkerProcess]) -> int:
    runs = collections.Counter(found.group(1) for worker in workers
                               for line in list(worker.lines)
                               if (found := _FINISHED.search(line)))
    return sum(count - 1 for count in runs.values())


def finished_lines(worker: WorkerProcess) -> int:
    return sum(1 for line in list(worker.lines) if _FINISHED.search(line))


async def check_verdicts(figures: Figures, reader: QueueTasks,
                         workers: list[WorkerProcess]) -> None:
    """The verdicts of the module docstring, with ``reader`` an app other than the
    producer (nothing in its inbox: every ``get`` reads the broker)."""
    failed = [r for r in figures.records if r.error or not r.id]
    await reader.start()
    for record in failed[:3]:  # what the store and the workers say of them
        state = await reader.get(record.id) if record.id else None
        ran = [line.strip() for worker in workers for line in list(worker.lines)
               if record.id and record.id in line]
        print(f"[cluster] failed {record.id}: get {state and state.status}; workers: {ran}")
    assert not failed, f"{len(failed)} tasks failed, e.g. {failed[:3]}"
    expected = list(reversed(range(YIELDS)))
    broken = [r for r in figures.records if r.values != expected]
    for record in broken[:3]:  # what a reader finds now, to tell where they went
        async with asyncio.timeout(30):
            again = [v async for v in reader.task_handle(record.id).stream()]
        print(f"[cluster] {record.id}: streamed {record.values}, read again {again}")
    assert not broken, f"{len(broken)} incomplete streams, e.g. {broken[:3]}"
    unsuccessful = [r for r in figures.records if r.status is not TaskStatus.SUCCESS]
    assert not unsuccessful, f"{len(unsuccessful)} waits without success: {unsuccessful[:3]}"
    missing: list[tuple[str, object]] = []
    started = time.monotonic()

    async def read(record: Record) -> None:
        state = await reader.get(record.id)
        if state is None or state.status is not TaskStatus.SUCCESS:
            missing.append((record.id, state and state.status))

    for at in range(0, len(figures.records), GETS_AT_ONCE):
        await asyncio.gather(*(read(r) for r in figures.records[at:at + GETS_AT_ONCE]))
    print(f"[cluster] {len(figures.records)} gets by id in {time.monotonic() - started:.1f} s")
    for task_id, _ in missing[:3]:  # what the store holds of them, to tell why
        history = await reader.results_store.history(task_id)
        print(f"[cluster] {task_id}: " + ", ".join(
            f"{e.kind}/{e.status or e.seq}@{e.ts:.3f}" for e in history or []))
    assert not missing, f"{len(missing)} tasks without a success readable by id: {missing[:3]}"
    for worker, before in zip(workers, figures.before_tail, strict=True):
        assert worker.proc.poll() is None, "a worker exited:\n" + worker.output[-3000:]
        assert finished_lines(worker) > before, \
            "a worker finished none of the tasks sent after the fault:\n" + worker.output[-3000:]
