"""The RabbitMQ broker (aio-pika): durable task queues, confirms, dead letters, delays."""

from qtasks.brokers.rabbitmq.broker import RabbitMQBroker
from qtasks.brokers.rabbitmq.delivery import RabbitMQDelivery

__all__ = ["RabbitMQBroker", "RabbitMQDelivery"]
