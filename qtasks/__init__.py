"""QTasks: an asyncio-first, broker-agnostic task queue that streams every ``yield``."""

from qtasks.app import QueueTasks
from qtasks.canvas import (
    Part,
    Signature,
    WorkflowFailed,
    WorkflowHandle,
    chain,
    chord,
    group,
)
from qtasks.context import TaskContext, current_task
from qtasks.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    MessageDecodeError,
    MessageEncodeError,
    MessageTooLargeError,
    NotSupportedError,
    OptionError,
    QTasksError,
    TaskCancelled,
    TaskFailedError,
    TaskTimeLimitExceeded,
    TaskTimeoutError,
    UnknownTaskError,
)
from qtasks.executors import AsyncTaskExecutor, BaseTaskExecutor, SyncTaskExecutor
from qtasks.interfaces import Broker, DeadLetter, Delivery, QueueStats, ResultStore
from qtasks.middleware import DeadLettered, Middleware, Outcome, WorkerInfo
from qtasks.protocol import ErrorInfo, ResultEvent, TaskMessage
from qtasks.schema import RetryPolicy, TaskExecSchema, TaskStatus
from qtasks.task import Restarted, Task
from qtasks.task_function import TaskFunction
from qtasks.worker import Worker

__all__ = [
    "AsyncTaskExecutor",
    "BaseTaskExecutor",
    "Broker",
    "BrokerUnavailableError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLettered",
    "Delivery",
    "ErrorInfo",
    "MessageDecodeError",
    "MessageEncodeError",
    "MessageTooLargeError",
    "Middleware",
    "NotSupportedError",
    "OptionError",
    "Outcome",
    "Part",
    "QTasksError",
    "QueueStats",
    "QueueTasks",
    "Restarted",
    "ResultEvent",
    "ResultStore",
    "RetryPolicy",
    "Signature",
    "SyncTaskExecutor",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskExecSchema",
    "TaskFailedError",
    "TaskFunction",
    "TaskMessage",
    "TaskStatus",
    "TaskTimeLimitExceeded",
    "TaskTimeoutError",
    "UnknownTaskError",
    "Worker",
    "WorkerInfo",
    "WorkflowFailed",
    "WorkflowHandle",
    "chain",
    "chord",
    "current_task",
    "group",
]
