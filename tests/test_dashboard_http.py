"""The dashboard's HTTP, JSON and server-sent-event endpoints, served for real over the
memory backends: the page and its headers, the overview, a task's stream (live and
replayed), the live feed on one subscription, dead letters, and the actions' guard."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qtasks.dashboard import DashboardSettings
from qtasks.protocol import ResultEvent, TaskMessage, encode
from tests.dashboard_support import TOKEN, served, sse

STATIC = Path(__file__).resolve().parent.parent / "qtasks" / "dashboard" / "static"
ACTIONS = DashboardSettings(allow_actions=True, token=TOKEN, overview_interval=0.1)


def final_of(task_id: str) -> Any:
    return lambda kind, data: kind == "event" and data["id"] == task_id \
        and data["kind"] == "final"


async def test_page_and_scripts_are_served_with_a_strict_policy() -> None:
    async with served(worker=False) as board:
        page = await board.client.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        for name in ("app.js", "pages.js", "style.css"):
            served_file = await board.client.get(f"/static/{name}")
            assert served_file.status_code == 200
            assert served_file.text == (STATIC / name).read_text()
        config = (await board.client.get("/api/config")).json()
        assert config["actions"] is False and config["broker"].startswith("memory://")


def test_the_page_never_writes_html_from_data() -> None:
    """Values go in as text: no innerHTML, outerHTML, insertAdjacentHTML or
    document.write anywhere in the page's scripts (the browser test shows the effect)."""
    for script in STATIC.glob("*.js"):
        text = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in text, f"{script.name} uses {sink}"


async def test_a_task_page_streams_partials_live_then_the_final() -> None:
    async with served(ACTIONS) as board:
        sent = await board.client.post("/api/tasks", headers=board.headers(),
                                       json={"task": "countdown", "args": [4, 0.05]})
        assert sent.status_code == 201, sent.text
        task_id = sent.json()["id"]
        events = await sse(board.client, f"/api/tasks/{task_id}/events",
                           lambda kind, data: kind == "end")
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "reset" and kinds[-1] == "end"
    data = [d for kind, d in events if kind == "event"]
    assert [d["value"] for d in data if d["kind"] == "partial"] == [3, 2, 1, 0]
    assert [d["seq"] for d in data if d["kind"] == "partial"] == [0, 1, 2, 3]
    running = next(d for d in data if d["kind"] == "status")
    assert running["status"] == "running" and running["args"] == [4, 0.05]
    assert data[-1]["kind"] == "final" and data[-1]["returning"] == [3, 2, 1, 0]


async def test_a_finished_task_is_replayed_from_its_first_event() -> None:
    async with served() as board:
        done = await board.app.add_task("countdown", 3, timeout=10)
        events = await sse(board.client, f"/api/tasks/{done.id}/events",
                           lambda kind, data: kind == "end")
        state = (await board.client.get(f"/api/tasks/{done.id}")).json()
        missing = await board.client.get("/api/tasks/0190aaaa-0000-7000-8000-000000000000")
        bad = await board.client.get("/api/tasks/%01")
    assert [d["value"] for k, d in events if k == "event" and d["kind"] == "partial"] \
        == [2, 1, 0]
    assert state["status"] == "success" and state["returning"] == [2, 1, 0]
    assert missing.status_code == 404 and "no task" in missing.json()["error"]
    assert bad.status_code == 400


async def test_a_retry_streams_as_a_new_attempt_with_the_error() -> None:
    async with served() as board:
        task = await board.app.add_task("flaky", timeout=10)
        events = await sse(board.client, f"/api/tasks/{task.id}/events",
                           lambda kind, data: kind == "end")
    data = [(d["kind"], d["attempt"], d.get("status"), d.get("value"))
            for kind, d in events if kind == "event"]
    assert data == [("status", 1, "running", None), ("partial", 1, None, 1),
                    ("status", 2, "new", None), ("status", 2, "running", None),
                    ("partial", 2, None, 2), ("final", 2, "success", None)]
    retry = next(d for kind, d in events if kind == "event" and d.get("status") == "new")
    assert retry["error"]["message"] == "the first attempt fails"


async def test_the_feed_fans_one_subscription_out_to_every_browser() -> None:
    async with served() as board:
        listeners = board.app.results_store.hub.listeners  # type: ignore[attr-defined]
        hello = await sse(board.client, "/api/stream", lambda kind, data: kind == "hello")
        assert hello[0][1]["events"] == [] and hello[0][1]["actions"] is False
        browsers = [asyncio.create_task(sse(board.client, "/api/stream",
                                            lambda k, d: k == "event"
                                            and d["kind"] == "final"))
                    for _ in range(4)]
        await _until(lambda: len(board.board.hub.clients), lambda n: n == 4)
        # However many browsers, the dashboard holds one subscription to every task.
        assert sum(len(subscribers) for subscribers in listeners.values()) == 1
        task = await board.app.add_task("countdown", 2, 0.05, timeout=10)
        seen = await asyncio.gather(*browsers)
        later = await sse(board.client, "/api/stream", lambda kind, data: kind == "hello")
    for events in seen:
        data = [d for kind, d in events if kind == "event"]
        assert [d["value"] for d in data if d["kind"] == "partial"] == [1, 0]
        assert data[-1]["id"] == task.id
    # A browser that opens later gets the recent events in its hello.
    assert [e["kind"] for e in later[0][1]["events"]] == ["status", "partial", "partial",
                                                          "final"]


async def test_overview_shows_queues_workers_and_rates() -> None:
    async with served(ACTIONS) as board:
        await board.app.add_task("echo", 1, timeout=10)
        pushed = await sse(board.client, "/api/stream",
                           lambda kind, data: kind == "overview" and data["workers"])
        overview = (await board.client.get("/api/overview")).json()
    reading = pushed[-1][1]
    assert [w["name"] for w in reading["workers"]] == ["test-worker"]
    assert reading["workers"][0]["state"] in ("online", "alive")
    queues = {q["queue"]: q for q in overview["queues"]}
    assert queues["default"]["ready"] == 0 and queues["default"]["consumers"] == 1
    assert overview["dead_letters"] == 0 and overview["error"] is None
    assert sum(overview["rates"]["finished"]) > 0 and overview["rates"]["step"] == 5


async def test_dead_letters_are_listed_requeued_and_purged() -> None:
    async with served(ACTIONS) as board:
        broker = board.app.broker
        await broker.publish(TaskMessage(id="x", task="t"), b"not json at all")
        unknown = TaskMessage(id="0190aaaa-0000-7000-8000-00000000000a", task="nobody")
        await broker.publish(unknown, encode(unknown))
        dead = await _until(lambda: board.client.get("/api/dead"),
                            lambda body: body["count"] == 2)
        letters = {d["reason"].split(":")[0]: d for d in dead["letters"]}
        assert letters["unknown task"]["task"] == "nobody"
        assert letters["unknown task"]["id"] == unknown.id
        assert letters["undecodable"]["body"] == "not json at all"
        ref = letters["undecodable"]["ref"]
        requeued = await board.client.post("/api/dead/requeue", headers=board.headers(),
                                           json={"refs": [ref, "0" * 16]})
        assert requeued.json() == {"requeued": [ref], "missing": ["0" * 16]}
        # The worker dead-letters it again; then purge empties the dead letters.
        await _until(lambda: board.client.get("/api/dead"), lambda body: body["count"] == 2)
        purged = await board.client.post("/api/dead/purge", headers=board.headers())
        assert purged.json() == {"purged": 2}
        assert (await board.client.get("/api/dead")).json()["count"] == 0


async def _until(get: Any, check: Any, deadline: float = 10.0) -> Any:
    """``get()`` (awaited if need be) until ``check`` of it holds, within ``deadline``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        value = get()
        if asyncio.iscoroutine(value):
            value = (await value).json()
        if check(value):
            return value
        assert loop.time() < end, f"not within {deadline} s: {value}"
        await asyncio.sleep(0.02)  # polling a figure: there is no event to wait on


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/tasks", {"task": "echo", "args": [1]}),
    ("POST", "/api/tasks/some-id/cancel", {}),
    ("POST", "/api/dead/requeue", {}),
    ("POST", "/api/dead/purge", {}),
])
async def test_actions_are_refused_read_only_and_without_the_token(
        method: str, path: str, body: dict[str, Any]) -> None:
    async with served(worker=False) as board:
        refused = await board.client.request(method, path, json=body,
                                             headers=board.headers())
        assert refused.status_code == 403 and "--allow-actions" in refused.json()["error"]
    async with served(ACTIONS, worker=False) as board:
        for headers in ({}, board.headers("x" * 32), board.headers(TOKEN[:-1])):
            refused = await board.client.request(method, path, json=body, headers=headers)
            assert refused.status_code == 401, refused.text
            assert "X-QTasks-Token" in refused.json()["error"]
        assert await board.app.broker.dead_count() == 0
        depth = (await board.app.broker.inspect(["default"]))[0].ready
        assert depth == 0  # nothing was submitted


async def test_cancel_from_the_dashboard_ends_a_running_task() -> None:
    async with served(ACTIONS) as board:
        task = await board.app.add_task("wait_for_cancel", 30)
        await sse(board.client, f"/api/tasks/{task.id}/events",
                  lambda kind, data: kind == "event" and data.get("status") == "running")
        sent = await board.client.post(f"/api/tasks/{task.id}/cancel",
                                       headers=board.headers(), json={"reason": "test"})
        assert sent.json() == {"id": task.id, "cancel": "sent"}
        await task.wait(10)
    assert task.status.value == "cancelled" and "test" in (task.error.message or "")


async def test_bad_submissions_get_a_clear_error() -> None:
    async with served(ACTIONS, worker=False) as board:
        post = board.client.post
        h = board.headers()
        cases = [(b"[1]", "must be a JSON object"), (b"{", "not JSON"),
                 (b'{"task": ""}', "'task'"), (b'{"task": "echo", "args": {}}', "'args'")]
        for content, message in cases:
            answer = await post("/api/tasks", headers=h, content=content)
            assert answer.status_code == 400 and message in answer.json()["error"]
        big = await post("/api/tasks", headers=h, content=b"[" + b"1," * 600_000 + b"1]")
        assert big.status_code == 400 and "over" in big.json()["error"]


async def test_only_loopback_host_names_are_answered_when_bound_to_loopback() -> None:
    settings = DashboardSettings(allowed_hosts=["127.0.0.1", "localhost"])
    async with served(settings, worker=False) as board:
        assert (await board.client.get("/api/config")).status_code == 200
        rebound = await board.client.get("/api/config", headers={"Host": "evil.example"})
        assert rebound.status_code == 400


async def test_a_task_stream_whose_read_fails_closes_without_end() -> None:
    """``end`` means the final was read: after a failed read the browser reconnects (and
    reads from the first again) instead of showing a task as finished."""
    async with served(worker=False) as board:
        async def broken(task_id: str) -> Any:
            yield ResultEvent(kind="status", id=task_id, task="t", status="running")
            raise ConnectionError("the store went away")

        board.app.results_store.watch = broken  # type: ignore[method-assign]
        with pytest.raises(AssertionError, match="the stream ended first") as failed:
            await sse(board.client, "/api/tasks/some-id/events",
                      lambda kind, data: kind == "end")
    assert "'status': 'running'" in str(failed.value)
