"""Delete what one harness run created on the brokers, and nothing else.

Every name the run creates (raw queues and streams, and every QTasks ``prefix``) begins
with the run's own prefix, ``qtb`` and 10 random hex digits. RabbitMQ queues and exchanges
are listed with ``rabbitmqctl`` (the management API is not assumed) and deleted over AMQP;
NATS streams (and KV buckets / object stores, which are streams named ``KV_<bucket>`` /
``OBJ_<bucket>``) are listed and deleted over the JetStream API.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from typing import Any

import orjson

from benchmarks.common import AMQP_URL, NATS_URL

log = logging.getLogger("benchmarks.cleanup")


def _mine(name: str, run_prefix: str) -> bool:
    name = name.lower()
    for head in ("kv_", "obj_"):
        if name.startswith(head + run_prefix):
            return True
    return name.startswith(run_prefix)


def _rabbitmqctl(what: str) -> list[str] | None:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "-q", what, "name", "--formatter", "json"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        rows: list[dict[str, Any]] = orjson.loads(out or "[]")
    except (subprocess.SubprocessError, orjson.JSONDecodeError, OSError) as exc:
        log.warning("rabbitmqctl %s failed: %s", what, exc)
        return None
    return [str(row["name"]) for row in rows]


async def rabbitmq(run_prefix: str, known_queues: list[str]) -> list[str]:
    """Delete the run's queues and exchanges; return what was deleted."""
    import aio_pika

    queues = _rabbitmqctl("list_queues")
    exchanges = _rabbitmqctl("list_exchanges") or []
    if queues is None:
        log.warning("rabbitmqctl unavailable: deleting only the queues the harness named")
        queues = known_queues
    deleted: list[str] = []
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                if not _mine(name, run_prefix):
                    continue
                # A channel each: a failed delete closes its channel.
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                    deleted.append(f"{kind} {name}")
                with contextlib.suppress(Exception):
                    await channel.close()
    finally:
        await connection.close()
    return deleted


async def nats(run_prefix: str) -> list[str]:
    """Delete the run's streams (with their consumers), KV buckets and object stores."""
    import nats as nats_client

    nc = await nats_client.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=3)
    deleted: list[str] = []
    try:
        js = nc.jetstream(timeout=10)
        names: list[str] = []
        for _ in range(100):  # pages of up to 256 streams
            page = await js.streams_info(offset=len(names))
            names += [info.config.name or "" for info in page]
            if not page:
                break
        for name in names:
            if _mine(name, run_prefix):
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
                    deleted.append(f"stream {name}")
    finally:
        await nc.close()
    return deleted
