"""The NATS JetStream broker (nats-py): a work-queue stream, one durable pull consumer per
queue, dead letters on a stream of their own."""

from qtasks.brokers.nats.broker import NatsBroker, NatsDelivery

__all__ = ["NatsBroker", "NatsDelivery"]
