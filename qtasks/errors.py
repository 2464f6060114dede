"""Every error QTasks raises on purpose: one base class, one subclass per cause."""

from __future__ import annotations


class QTasksError(Exception):
    """Base of every error raised by QTasks itself."""


class ConfigurationError(QTasksError):
    """The app or a backend was set up with something it cannot do (a bad URL, an option
    the backend does not support). Raised before anything is published."""


class NotSupportedError(QTasksError, NotImplementedError):
    """The backend cannot do this at all (an optional operation it does not offer, such
    as cancelling on a broker without broadcast). Also a ``NotImplementedError``."""


class OptionError(QTasksError, ValueError):
    """An option of ``add_task``/``send_task`` has a value it cannot take (a priority
    that is not an integer, a negative delay ...). Raised before anything is published."""


class MessageEncodeError(QTasksError, TypeError):
    """A task's arguments or a result cannot be encoded as JSON."""


class MessageTooLargeError(QTasksError, ValueError):
    """An encoded message is over the configured or the broker's size limit."""


class MessageDecodeError(QTasksError, ValueError):
    """A message body is not a valid protocol-v1 message."""


class UnknownTaskError(QTasksError, LookupError):
    """No task of that name is registered with the app."""


class TaskTimeoutError(QTasksError, TimeoutError):
    """Waiting for a task ran out of time. The task itself goes on."""

    def __init__(self, task_id: str, timeout: float | None) -> None:
        super().__init__(f"task {task_id} did not finish within {timeout} s (it goes on running)")
        self.task_id = task_id
        self.timeout = timeout


class TaskFailedError(QTasksError):
    """Raised by ``Task.result()`` when the task ended in ``error`` or ``cancelled``."""


class BrokerUnavailableError(QTasksError, ConnectionError):
    """The broker or result store cannot be reached (after its retries)."""


class TaskCancelled(QTasksError):
    """A task was cancelled on request; reported as the final error's type."""


class TaskTimeLimitExceeded(QTasksError):
    """A task ran longer than its ``max_time``; reported as the final error's type."""


class LeadershipLost(QTasksError):
    """A periodic scheduler's turn as leader ended (``Broker.lead``): another process leads
    now, so this one enqueues nothing more until it leads again."""
