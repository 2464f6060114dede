"""The NATS JetStream result store (nats-py): a results stream, a live inbox per
submitter, and a KV bucket with each task's latest state."""

from qtasks.results.nats.store import NatsResultStore

__all__ = ["NatsResultStore"]
