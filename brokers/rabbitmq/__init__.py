"""The RabbitMQ broker (aio-pika): durable task queues, confirms, dead letters, delays."""

from qtasks.brokers.rabbitmq.broker import RabbitMQBroker, RabbitMQDelivery

__all__ = ["RabbitMQBroker", "RabbitMQDelivery"]
