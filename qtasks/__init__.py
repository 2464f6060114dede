"""QTasks: an asyncio-first, broker-agnostic task queue that streams every ``yield``."""

from qtasks.app import QueueTasks
from qtasks.cancellation import TaskCancelled
from qtasks.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    MessageDecodeError,
    MessageEncodeError,
    MessageTooLargeError,
    QTasksError,
    TaskFailedError,
    TaskTimeoutError,
    UnknownTaskError,
)
from qtasks.executors import AsyncTaskExecutor, BaseTaskExecutor, SyncTaskExecutor
from qtasks.interfaces import Broker, DeadLetter, Delivery, QueueStats, ResultStore
from qtasks.protocol import ErrorInfo, ResultEvent, TaskMessage
from qtasks.task import Restarted, RetryPolicy, Task, TaskExecSchema, TaskFunction, TaskStatus
from qtasks.worker import Worker

__all__ = [
    "AsyncTaskExecutor",
    "BaseTaskExecutor",
    "Broker",
    "BrokerUnavailableError",
    "ConfigurationError",
    "DeadLetter",
    "Delivery",
    "ErrorInfo",
    "MessageDecodeError",
    "MessageEncodeError",
    "MessageTooLargeError",
    "QTasksError",
    "QueueStats",
    "QueueTasks",
    "Restarted",
    "ResultEvent",
    "ResultStore",
    "RetryPolicy",
    "SyncTaskExecutor",
    "Task",
    "TaskCancelled",
    "TaskExecSchema",
    "TaskFailedError",
    "TaskFunction",
    "TaskMessage",
    "TaskStatus",
    "TaskTimeoutError",
    "UnknownTaskError",
    "Worker",
]
