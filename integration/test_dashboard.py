"""The dashboard's HTTP and push endpoints on both real brokers: a ``qtasks dashboard``
process and a CLI worker process, tasks sent from other processes, read as a browser
would (JSON and server-sent events over HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.dashboard_support import TOKEN, Deployment, deployment_on, running_dashboard
from integration.processes import workers
from tests.dashboard_support import sse

DEADLINE = 60.0
HEADERS = {"X-QTasks-Token": TOKEN}


@pytest.fixture(params=["rabbitmq", "nats"])
def deployment(request: pytest.FixtureRequest, prefix: str,
               tmp_path: Path) -> Iterator[Deployment]:
    yield from deployment_on(request.param, prefix, tmp_path)


async def until(client: httpx.AsyncClient, path: str, check: Callable[[Any], bool],
                deadline: float = DEADLINE) -> Any:
    """GET ``path`` until ``check`` holds for its JSON, within ``deadline`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        body = (await client.get(path)).json()
        if check(body):
            return body
        assert loop.time() < end, f"{path} not within {deadline} s: {body}"
        await asyncio.sleep(0.1)  # polling an HTTP endpoint: no event to wait on


def partials(events: list[tuple[str, Any]], task_id: str) -> list[Any]:
    return [d["value"] for k, d in events
            if k == "event" and d["id"] == task_id and d["kind"] == "partial"]


async def test_overview_feed_and_task_streams(deployment: Deployment) -> None:
    with workers(deployment.env, count=1) as (worker,), \
            running_dashboard(deployment.env) as board:
        async with httpx.AsyncClient(base_url=board.url, timeout=DEADLINE) as client:
            overview = await until(client, "/api/overview", lambda o: o["workers"])
            assert [w["pid"] for w in overview["workers"]] == [worker.pid]
            queues = {q["queue"]: q for q in overview["queues"]}
            assert queues["default"]["consumers"] == 1 and queues["default"]["ready"] == 0
            assert overview["dead_letters"] == 0 and overview["listening"] is True

            # The live feed: a task sent from another process, pushed as it runs.
            hello = asyncio.Event()

            def countdown_final(kind: str, data: Any) -> bool:
                if kind == "hello":
                    hello.set()
                return kind == "event" and data["task"] == "countdown" \
                    and data["kind"] == "final"

            feed = asyncio.create_task(sse(client, "/api/stream", countdown_final))
            await asyncio.wait_for(hello.wait(), DEADLINE)
            sent = await asyncio.to_thread(deployment.send, "countdown", 3, 0.05)
            events = await feed
            assert partials(events, sent) == [2, 1, 0]
            assert events[-1][1]["id"] == sent and events[-1][1]["returning"] == [2, 1, 0]

            # A task submitted from the dashboard: its page's stream, live, then replayed.
            values = ["<script>alert(1)</script>", {"n": 1}, 3]
            submitted = await client.post("/api/tasks", headers=HEADERS,
                                          json={"task": "say", "args": values})
            assert submitted.status_code == 201, submitted.text
            task_id = submitted.json()["id"]
            for _ in range(2):  # live the first time, a replay from the first the second
                stream = await sse(client, f"/api/tasks/{task_id}/events",
                                   lambda kind, data: kind == "end")
                assert partials(stream, task_id) == values
                final = stream[-2][1]
                assert final["kind"] == "final" and final["returning"] == values
                assert final["args"] == values and final["worker"]
            state = (await client.get(f"/api/tasks/{task_id}")).json()
            assert state["status"] == "success"


async def test_dead_letters_and_cancel(deployment: Deployment) -> None:
    with workers(deployment.env, count=1), running_dashboard(deployment.env) as board:
        async with httpx.AsyncClient(base_url=board.url, timeout=DEADLINE) as client:
            unknown = await asyncio.to_thread(deployment.send, "no_such_task", 1)
            dead = await until(client, "/api/dead", lambda d: d["count"] == 1)
            letter = dead["letters"][0]
            assert letter["reason"] == "unknown task: 'no_such_task'"
            assert (letter["task"], letter["id"], letter["args"]) == ("no_such_task",
                                                                      unknown, [1])
            refused = await client.post("/api/dead/requeue", json={"refs": [letter["ref"]]})
            assert refused.status_code == 401
            moved = await client.post("/api/dead/requeue", headers=HEADERS,
                                      json={"refs": [letter["ref"]]})
            assert moved.json() == {"requeued": [letter["ref"]], "missing": []}
            # Requeued, it reaches the worker again, which dead-letters it again.
            overview = await until(client, "/api/overview",
                                   lambda o: o["dead_letters"] == 1
                                   and o["workers"] and o["workers"][0]["processed"] >= 2)
            assert overview["error"] is None
            purged = await client.post("/api/dead/purge", headers=HEADERS)
            assert purged.json() == {"purged": 1}
            assert (await client.get("/api/dead")).json()["count"] == 0

            running = await asyncio.to_thread(deployment.send, "long_task", "c", 120)
            await sse(client, f"/api/tasks/{running}/events",
                      lambda kind, data: kind == "event" and data.get("status") == "running")
            cancelled = await client.post(f"/api/tasks/{running}/cancel", headers=HEADERS,
                                          json={"reason": "from the test"})
            assert cancelled.json() == {"id": running, "cancel": "sent"}
            stream = await sse(client, f"/api/tasks/{running}/events",
                               lambda kind, data: kind == "end")
            final = stream[-2][1]
            assert final["status"] == "cancelled" and "from the test" in final["error"][
                "message"]
