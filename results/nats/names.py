"""The names of one results namespace (all derive from ``prefix``, see ``docs/nats.md``):

- stream ``{prefix}_RESULTS`` captures ``{prefix}.results.>``; every event of a task is
  published on ``{prefix}.results.<reply>.<task>.<id>`` (each encoded with
  ``settings.token``; ``<reply>`` is the submitter's ``reply_address``, ``_`` if it gave
  none), so one task is one subject, one task name one wildcard, and a submitter receives
  the results of everything it submitted through one subscription;
- KV bucket ``{prefix}_status`` (stream ``KV_{prefix}_status``) keeps, under the encoded
  task id, the task's newest ``status`` or ``final`` event, for ``get``.
"""

from __future__ import annotations

from qtasks.brokers.nats.settings import token


class Names:
    """Subjects, stream and bucket of one prefix."""

    __slots__ = ("bucket", "prefix", "stream")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}_RESULTS"
        self.bucket = f"{prefix}_status"

    def subject(self, task_name: str, task_id: str, reply_to: str | None = None) -> str:
        reply = token(reply_to) if reply_to else "_"
        return f"{self.prefix}.results.{reply}.{token(task_name)}.{token(task_id)}"

    def task_subjects(self, task_id: str) -> str:
        """Every event of one task, whoever submitted it."""
        return f"{self.prefix}.results.*.*.{token(task_id)}"

    def replies(self, reply: str) -> str:
        """Every event of the tasks submitted with ``reply`` as their reply address."""
        return f"{self.prefix}.results.{reply}.>"

    def by_name(self, task_name: str) -> str:
        """Every event of every run of ``task_name`` (``"*"``: of every task)."""
        name = "*" if task_name == "*" else token(task_name)
        return f"{self.prefix}.results.*.{name}.*"

    def key_subject(self, task_id: str) -> str:
        return f"$KV.{self.bucket}.{token(task_id)}"
