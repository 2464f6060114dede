"""A RabbitMQ URL naming several hosts: how it is read, what is refused, and the order in
which ``FailoverConnection`` tries the hosts (the connection itself, against real
clusters, is in integration/test_cluster_rabbitmq.py)."""

from __future__ import annotations

import asyncio

import pytest

from qtasks.brokers.rabbitmq import RabbitMQBroker
from qtasks.brokers.rabbitmq.hosts import FailoverConnection
from qtasks.brokers.rabbitmq.settings import AmqpSettings
from qtasks.errors import ConfigurationError


def test_hosts_share_credentials_vhost_and_options() -> None:
    settings = AmqpSettings.parse(
        "amqp://u:secret@h1:5672,h2:5673,h3/shop?prefix=app&heartbeat=5", {})
    assert settings.hosts == [
        f"amqp://u:secret@{host}/shop?heartbeat=5&reconnect_interval=1.0"
        for host in ("h1:5672", "h2:5673", "h3")]
    assert settings.connection_url == settings.hosts[0]
    assert settings.prefix == "app"
    assert "secret" not in settings.display_url and "h3" in settings.display_url


def test_full_urls_separated_by_commas_or_in_a_list() -> None:
    text = "amqps://a:1@h1:5671/v,amqps://b:2@h2:5671/v?prefix=p&host_timeout=2"
    for url in (text, text.split(",")):
        settings = AmqpSettings.parse(url, {})
        assert [h.split("?")[0] for h in settings.hosts] == [
            "amqps://a:1@h1:5671/v", "amqps://b:2@h2:5671/v"]
        assert settings.prefix == "p" and settings.host_timeout == 2.0
        assert ":1@" not in settings.display_url and ":2@" not in settings.display_url
    assert RabbitMQBroker(text.split(",")).settings.hosts[1].startswith("amqps://b:2@h2")


def test_one_host_reads_as_before() -> None:
    settings = AmqpSettings.parse("amqp://u:pw@h:5673/vh?heartbeat=30", {})
    assert settings.hosts == ["amqp://u:pw@h:5673/vh?heartbeat=30&reconnect_interval=1.0"]


@pytest.mark.parametrize(("url", "message"), [
    ("amqp://h1/a,amqp://h2/b", "one vhost"),
    ("amqp://h1/,amqps://h2/", "one scheme"),
    ("amqp://u:p@h1,,h3/", "empty host"),
    ("amqp://u:p@h1,h2:x/", "(?i)port"),
    ("amqp://h1,amqp://h2,h3", "several hosts"),
    ("nats://h1,h2", "not an AMQP URL"),
    ("amqp://h1?host_timeout=0", "host_timeout"),
])
def test_a_url_that_cannot_name_the_same_deployment_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        AmqpSettings.parse(url, {})
    assert "secret" not in str(caught.value)


async def test_each_attempt_tries_the_hosts_in_turn_after_the_last_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One reconnection attempt goes through every host, beginning after the host last
    connected to; a host that answers ends it. Only the transport attempt is replaced."""
    tried: list[int] = []
    answering = {2}

    async def attempt(self: FailoverConnection) -> None:
        port = self.url.port or 0
        tried.append(port)
        if port not in answering:
            raise ConnectionRefusedError(port)

    monkeypatch.setattr(FailoverConnection.__mro__[1],
                        "_RobustConnection__connect_transport", attempt)
    connection = FailoverConnection([f"amqp://h:{p}/" for p in (1, 2, 3)])
    connection._next = 0
    await connection._RobustConnection__connect_transport()  # type: ignore[attr-defined]
    assert tried == [1, 2] and connection.host_index == 1
    tried.clear()
    answering = {1}  # host 2 died: the next attempt starts with host 3
    await connection._RobustConnection__connect_transport()  # type: ignore[attr-defined]
    assert tried == [3, 1] and connection.host_index == 0
    tried.clear()
    answering = set()
    with pytest.raises(ConnectionRefusedError):
        await connection._RobustConnection__connect_transport()  # type: ignore[attr-defined]
    assert sorted(tried) == [1, 2, 3]
    await asyncio.sleep(0)
