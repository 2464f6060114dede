"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, a
``qtasks dashboard`` process and a CLI worker on RabbitMQ, tasks started from other
processes. A generator task's partials appear on its page while it runs, in order, then
its final; markup in a partial shows as text and never runs; a running task is cancelled
from the page with the token.

``QTASKS_DASHBOARD_SCREENSHOT=docs/dashboard.png`` saves the overview as the docs show it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from integration.apps import open_gate
from integration.conftest import require_tools
from integration.dashboard_support import TOKEN, Deployment, deployment_on, running_dashboard
from integration.processes import workers

WAIT_MS = 30_000
expect.set_options(timeout=WAIT_MS)  # a loaded CI machine: deadlines, not 5 s
INJECTED = ["<script>window.qtasksInjected = 1</script>",
            '<img src="x" onerror="window.qtasksInjected = 2">']


@pytest.fixture
def deployment(prefix: str, tmp_path: Path) -> Iterator[Deployment]:
    yield from deployment_on("rabbitmq", prefix, tmp_path)


@pytest.fixture
def page() -> Iterator[Page]:
    require_tools("chromium")  # Debian's package; a missing browser fails in CI
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda dialog: (errors.append(f"dialog {dialog.message}"),
                                              dialog.dismiss()))
            yield page
            assert errors == [], errors  # no script error, no alert() from a value
        finally:
            browser.close()


def open_task(page: Page, task_id: str) -> None:
    page.evaluate("id => { location.hash = '#/task/' + encodeURIComponent(id); }", task_id)
    expect(page.locator("#task-title")).to_contain_text(task_id)


def test_partials_live_in_order_markup_as_text_and_cancel(deployment: Deployment,
                                                          page: Page) -> None:
    with workers(deployment.env, count=1) as (worker,), \
            running_dashboard(deployment.env) as board:
        page.goto(f"{board.url}/#token={TOKEN}")
        expect(page.locator("#health")).to_have_text("live")
        expect(page.locator("#mode")).to_have_text("actions on")
        expect(page.locator("#workers tbody tr")).to_have_count(1)
        expect(page.locator("#workers tbody tr td").nth(2)).to_have_text(str(worker.pid))

        # A generator task started by another process: the overview's feed shows it, and
        # its page shows the first partial while the task waits at its gate.
        task_id = deployment.send("gated_countdown", 5)
        expect(page.locator(f"#feed-rows a[title='{task_id}']").first).to_be_visible()
        open_task(page, task_id)
        items = page.locator("#partials-1 li")
        status = page.locator("#task-summary .field-status")
        expect(items).to_have_count(1)
        expect(items.first).to_have_text("4")
        expect(status).to_have_text("running")
        expect(page.locator("#task-outcome")).to_have_text("not finished yet")
        open_gate(deployment.test_dir)
        expect(items).to_have_count(5)
        assert items.all_text_contents() == ["4", "3", "2", "1", "0"]
        expect(status).to_have_text("success")
        expect(page.locator("#task-returning")).to_have_text("[4,3,2,1,0]")
        expect(page.locator("#task-args")).to_have_text("args [5]\nkwargs {}")

        # A retried task: each attempt with its partials, the failed one with its error.
        retried = deployment.send("flaky", 1)
        open_task(page, retried)
        expect(status).to_have_text("success")
        expect(page.locator("#attempt-1 .attempt-status")).to_contain_text(
            "retried as attempt 2")
        expect(page.locator("#attempt-1 .error-line")).to_have_text(
            "RuntimeError: attempt 1 fails")
        expect(page.locator("#attempt-1 .traceback")).to_contain_text("Traceback")
        assert page.locator("#partials-1 li").all_text_contents() == ["1"]
        assert page.locator("#partials-2 li").all_text_contents() == ["2"]
        expect(page.locator("#task-summary .field-attempt")).to_have_text("2")

        # Markup in values is shown as text, on the task's page and in the feed.
        shown = deployment.send("say", *INJECTED)
        open_task(page, shown)
        expect(page.locator("#partials-1 li")).to_have_count(2)
        assert page.locator("#partials-1 li").all_text_contents() == [
            json.dumps(v, separators=(",", ":")) for v in INJECTED]
        expect(page.locator("#task-args")).to_contain_text("<script>window.qtasksInjected")
        page.evaluate("location.hash = '#/'")
        page.locator("#feed-task").fill("say")
        expect(page.locator("#feed-rows td.detail").first).to_contain_text("<img src=")
        assert page.locator("#main script, #main img").count() == 0
        assert page.evaluate("window.qtasksInjected") is None

        # Cancel a running task from its page, with the token the link carried.
        running = deployment.send("long_task", "browser", 120)
        open_task(page, running)
        expect(status).to_have_text("running")
        page.locator("#task-cancel").click()
        expect(status).to_have_text("cancelled")
        expect(page.locator("#task-outcome .error-line")).to_contain_text("TaskCancelled")
        expect(page.locator("#task-cancel")).to_be_disabled()

        # The feed pauses: new events are counted, not shown, until it resumes.
        page.evaluate("location.hash = '#/'")
        page.locator("#feed-task").fill("countdown")
        page.locator("#feed-pause").click()
        before = page.locator("#feed-rows tr").count()
        paused_id = deployment.send("countdown", 2)
        expect(page.locator("#feed-held")).to_contain_text("new while paused")
        assert page.locator(f"#feed-rows a[title='{paused_id}']").count() == 0
        assert page.locator("#feed-rows tr").count() == before
        page.locator("#feed-pause").click()
        expect(page.locator(f"#feed-rows a[title='{paused_id}']").first).to_be_visible()

        if os.environ.get("QTASKS_DASHBOARD_SCREENSHOT"):
            page.locator("#feed-task").fill("")
            page.screenshot(path=os.environ["QTASKS_DASHBOARD_SCREENSHOT"])
