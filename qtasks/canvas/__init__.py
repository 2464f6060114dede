"""Workflows: signatures and what is composed of them (``chain``, ``group``, ``chord``,
the stream fan-out ``.each()``), carried in the task messages' headers and advanced by
the workers that finish their steps. See ``docs/workflows.md``."""

from qtasks.canvas.handle import Part, WorkflowFailed, WorkflowHandle, WorkflowTimeoutError
from qtasks.canvas.signature import Canvas, Chain, Each, Group, Signature, chain, chord, group

__all__ = ["Canvas", "Chain", "Each", "Group", "Part", "Signature", "WorkflowFailed",
           "WorkflowHandle", "WorkflowTimeoutError", "chain", "chord", "group"]
