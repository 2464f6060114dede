"""Task arguments never collide with ``add_task``'s options, and bad options fail early."""

from __future__ import annotations

import pytest

from qtasks import (
    ConfigurationError,
    OptionError,
    QTasksError,
    QueueTasks,
    Task,
    TaskFunction,
    Worker,
)


@pytest.fixture
async def app() -> QueueTasks:
    app = QueueTasks()  # memory://, an embedded worker

    @app.task
    async def echo(x: int, timeout: float = 0.0, task_id: str = "", delay: float = 0.0,
                   priority: str = "") -> dict[str, object]:
        return {"x": x, "timeout": timeout, "task_id": task_id, "delay": delay,
                "priority": priority}

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    return app


async def test_apply_async_passes_any_argument_name_to_the_task(app: QueueTasks) -> None:
    async with app:
        kwargs = {"timeout": 1.5, "task_id": "mine", "delay": 0.2, "priority": "high"}
        task = await app.send_task("echo", [1], kwargs, timeout=10)
        assert task.returning == {"x": 1, **kwargs}
        assert task.id != "mine"  # the task's argument, not the message id
        again = await echo_of(app).apply_async([2], {"timeout": 3.0}, timeout=10)
        assert again.returning["timeout"] == 3.0 and again.returning["x"] == 2


async def test_an_option_named_like_a_task_parameter_is_refused_as_ambiguous(
        app: QueueTasks) -> None:
    async with app:
        with pytest.raises(OptionError, match=r"parameter named timeout.*apply_async"):
            await app.add_task("echo", 1, timeout=5)
        with pytest.raises(OptionError, match="parameter named delay, task_id"):
            await echo_of(app).add_task(1, task_id="x", delay=0.1)
        # A task without such parameters takes them as options, as the seed does.
        assert (await app.add_task("add", 2, 3, timeout=10)).returning == 5


@pytest.mark.parametrize(("options", "says"), [
    ({"priority": "high"}, "priority must be an integer, not str 'high'"),
    ({"priority": True}, "priority must be an integer"),
    ({"priority": -1}, "priority -1 is outside"),
    ({"delay": "0.2"}, "delay must be a number of seconds, not str"),
    ({"delay": -1}, "delay must be at least 0 seconds"),
    ({"timeout": float("nan")}, "timeout must be"),
    ({"max_time": 0}, "max_time must be more than 0 seconds"),
    ({"task_id": ""}, "task_id must be a non-empty string"),
    ({"task_id": 7}, "task_id must be a non-empty string, not int 7"),
    ({"queue": ""}, "queue must be a non-empty string"),
    ({"headers": {"a": 1}}, "headers must map strings to strings"),
])
async def test_bad_option_values_fail_before_anything_is_published(
        app: QueueTasks, options: dict[str, object], says: str) -> None:
    async with app:
        with pytest.raises(QTasksError, match=says):
            await app.add_task("add", 1, 2, **options)  # type: ignore[arg-type]
        with pytest.raises(QTasksError, match=says):
            await app.send_task("add", [1, 2], **options)  # type: ignore[arg-type]
        assert (await app.broker.inspect(["default"]))[0].ready == 0


async def test_send_task_refuses_arguments_json_cannot_name(app: QueueTasks) -> None:
    async with app:
        with pytest.raises(OptionError, match="args must be a list or tuple, not str"):
            await app.send_task("add", "12")
        with pytest.raises(OptionError, match="kwargs must map argument names"):
            await app.send_task("add", [], {1: 2})  # type: ignore[dict-item]


def test_mistakes_outside_add_task_are_qtasks_errors_too(app: QueueTasks) -> None:
    with pytest.raises(ConfigurationError, match="concurrency must be an integer of 1"):
        Worker(app, concurrency=0)
    with pytest.raises(ConfigurationError, match="not bound to an app"):
        Task(id="x", name="t").cancel().send(None)


def echo_of(app: QueueTasks) -> TaskFunction:
    """The ``echo`` task as its decorator returned it."""
    return TaskFunction(app, app.registry["echo"])
