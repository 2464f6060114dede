"""The dashboard's parts on their own: the hub's bounded fan-out and its rates, the feed's
size limit, the settings' checks, the command's one-line errors, the arguments that result
events carry, and ``import qtasks`` without the web stack."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import orjson
import pytest

from qtasks import QueueTasks
from qtasks.cli import main
from qtasks.dashboard.actions import MIN_TOKEN
from qtasks.dashboard.hub import FEED_MAX, Client, EventHub, Rates, feed_entry
from qtasks.dashboard.server import bind, is_loopback, settings_of
from qtasks.errors import ConfigurationError
from qtasks.protocol import ErrorInfo, ResultEvent, decode_result, encode
from qtasks.running import ARGUMENTS_SHOWN


def test_import_qtasks_loads_no_web_stack() -> None:
    code = ("import sys, qtasks, qtasks.cli; "
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'starlette', 'uvicorn', 'httpx', 'anyio', 'playwright'}); "
            "assert not loaded, loaded; "
            "assert 'qtasks.dashboard' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_slow_browser_loses_events_counted_never_blocks() -> None:
    client = Client(size=2)
    for n in range(5):
        client.offer("event", str(n).encode())

    async def read(count: int) -> list[tuple[str, bytes]]:
        return [await client.next() for _ in range(count)]

    got = asyncio.run(read(3))
    assert got == [("gap", b'{"dropped":3}'), ("event", b"0"), ("event", b"1")]


def test_rates_count_finals_and_failures_per_bucket() -> None:
    rates = Rates()
    now = 1_000_000.0

    def final(status: str) -> ResultEvent:
        return ResultEvent(kind="final", id="i", task="t", status=status)

    for status in ("success", "success", "error", "cancelled"):
        rates.add(final(status), now)
    retried = ResultEvent(kind="status", id="i", task="t", status="new",
                          error=ErrorInfo("E", "m"))
    rates.add(retried, now - 10)
    rates.add(ResultEvent(kind="partial", id="i", task="t"), now)
    series = rates.series(now, step=5, span=60)
    assert len(series["finished"]) == 12 and series["end"] > now
    assert series["finished"][-1] == 4 / 5 and series["failed"][-1] == 1 / 5
    assert series["failed"][-3] == 1 / 5 and sum(series["finished"][:-1]) == 0
    rates.add(final("success"), now + 700)  # the old seconds fall out of the window
    assert [s[0] for s in rates.seconds] == [int(now) + 700]


def test_feed_entries_are_bounded_and_the_hub_remembers_tasks() -> None:
    big = ResultEvent(kind="final", id="a", task="t", status="success",
                      returning="x" * (FEED_MAX * 2), args=["y" * 10], kwargs={})
    entry = orjson.loads(feed_entry(big))
    assert entry["returning"] == {"elided": FEED_MAX * 2 + 2} and entry["id"] == "a"
    small = ResultEvent(kind="partial", id="a", task="t", seq=0, value="<script>")
    assert orjson.loads(feed_entry(small))["value"] == "<script>"

    async def follow() -> EventHub:
        async def nothing() -> ResultEvent:
            raise AssertionError("not read")

        hub = EventHub(nothing, history=2)  # type: ignore[arg-type]
        with hub.attach() as client:
            assert hub.watched.is_set()
            for seq in range(3):
                hub.take(ResultEvent(kind="partial", id="b", task="t", seq=seq))
            hub.take(big)
            assert client.queue.qsize() == 4
        assert not hub.watched.is_set()
        return hub

    hub = asyncio.run(follow())
    assert len(hub.recent) == 2 and hub.received == 4
    assert [t["id"] for t in hub.recent_tasks()] == ["a", "b"]
    assert hub.recent_tasks()[1]["partials"] == 3 and hub.recent_tasks()[0]["status"] \
        == "success"


def test_settings_refuse_a_token_without_actions_and_a_short_one() -> None:
    with pytest.raises(ConfigurationError, match="--allow-actions"):
        settings_of("127.0.0.1", False, "t" * 32, ["default"])
    with pytest.raises(ConfigurationError, match=f"at least {MIN_TOKEN}"):
        settings_of("127.0.0.1", True, "short", ["default"])
    made = settings_of("127.0.0.1", True, None, ["default"])
    assert made.token and len(made.token) >= 32 and made.allowed_hosts
    assert settings_of("127.0.0.1", False, None, ["q"]).token is None
    assert settings_of("0.0.0.0", False, None, ["q"]).allowed_hosts is None
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0",
                                     "example.com")] == [True, True, True, False, False]


def test_the_command_says_what_is_wrong_in_one_line(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QTASKS_BROKER_URL", raising=False)
    monkeypatch.delenv("QTASKS_DASHBOARD_TOKEN", raising=False)
    assert main(["dashboard"]) == 2
    assert "no broker" in capsys.readouterr().err
    assert main(["dashboard", "--broker", "memory://", "--token", "x" * 20]) == 2
    assert "--allow-actions" in capsys.readouterr().err
    monkeypatch.setenv("QTASKS_DASHBOARD_TOKEN", "short")
    assert main(["dashboard", "--broker", "memory://", "--allow-actions"]) == 2
    assert f"at least {MIN_TOKEN}" in capsys.readouterr().err
    monkeypatch.delenv("QTASKS_DASHBOARD_TOKEN")
    busy = bind("127.0.0.1", 0)
    try:
        port = str(busy.getsockname()[1])
        assert main(["dashboard", "--broker", "memory://", "--port", port]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    finally:
        busy.close()
    with pytest.raises(SystemExit):
        main(["dashboard", "--port", "70000"])
    assert "expected a port" in capsys.readouterr().err


def test_bind_refuses_an_unknown_host() -> None:
    with pytest.raises(ConfigurationError, match=r"cannot listen on no-such-host\.invalid"):
        bind("no-such-host.invalid", 0)
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[1] > 0
    finally:
        sock.close()


async def test_status_and_final_carry_small_arguments_only() -> None:
    async with QueueTasks("memory://") as app:
        @app.task
        async def slow(value: str, *, tag: str = "") -> int:
            await asyncio.sleep(0.1)  # long enough for its running status
            return len(value)

        events = await app.subscribe("slow")
        small = await app.add_task("slow", "v", tag="<b>", timeout=10)
        large = await app.add_task("slow", "x" * ARGUMENTS_SHOWN, timeout=10)
        seen: list[ResultEvent] = []
        async for event in events:
            seen.append(event)
            if sum(e.kind == "final" for e in seen) == 2:
                break
    for event in seen:
        decoded = decode_result(encode(event))  # as a reader in another process sees it
        if event.id == small.id:
            assert (decoded.args, decoded.kwargs) == (["v"], {"tag": "<b>"}), event
        else:
            assert event.id == large.id and decoded.args is None and decoded.kwargs is None
            assert "args" not in event.to_dict()
    assert {e.kind for e in seen if e.id == small.id} == {"status", "final"}
