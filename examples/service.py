"""The tasks of the compose deployment: one app module shared by workers and producers.

Broker and result store come from ``QTASKS_BROKER_URL`` / ``QTASKS_RESULTS_URL``, so the
same image runs on RabbitMQ, on NATS, or on both.
"""

from __future__ import annotations

import asyncio
import hashlib

from qtasks import QueueTasks

app = QueueTasks()


async def as_progress(chunk: int) -> dict[str, int]:
    return {"chunk": chunk}


@app.task(description="Processes a file in chunks, reporting each one as it is done.",
          generate_handler=as_progress, max_time=300, retry=2)
async def process_file(name: str, chunks: int = 10, pause: float = 0.3):  # type: ignore[no-untyped-def]
    for chunk in range(chunks):
        await asyncio.sleep(pause)  # stands for real work on one chunk
        yield chunk


@app.task(description="A CPU-bound sync task: runs in a worker thread.")
def checksum(text: str, rounds: int = 10_000) -> str:
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()
