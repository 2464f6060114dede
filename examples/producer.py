"""A producer service: enqueues work and streams its progress, forever (compose demo)."""

from __future__ import annotations

import asyncio
import os
import time

from examples.service import app, checksum, process_file


async def main() -> None:
    every = float(os.environ.get("PRODUCER_EVERY", "2"))
    async with app:
        n = 0
        while True:
            n += 1
            task = await process_file.add_task(f"file-{n}.csv", chunks=5)
            begin = time.perf_counter()
            async for part in task.stream():
                print(f"{task.id} +{time.perf_counter() - begin:.2f}s {part}", flush=True)
            await task.wait(timeout=60)
            digest = await checksum.add_task(f"file-{n}", timeout=60)
            print(f"file-{n}: {task.status.value}, checksum {digest.returning[:12]}", flush=True)
            await asyncio.sleep(every)


if __name__ == "__main__":
    asyncio.run(main())
