"""The RabbitMQ result store (aio-pika): results published once to a topic exchange, read
live by the submitter's inbox and listeners, replayed from a stream queue."""

from qtasks.results.rabbitmq.store import RabbitMQResultStore

__all__ = ["RabbitMQResultStore"]
