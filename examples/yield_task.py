"""The seed's example, as written in "Tasks with yield": prints [8, 9, 10, 11, 12]."""

import asyncio

from qtasks import QueueTasks

app = QueueTasks()


async def yield_func(result: int) -> int:
    print(result)
    return result + 2


@app.task(description="Test task with a generator.", generate_handler=yield_func)
async def test_yield(n: int):
    for _ in range(n):
        n += 1
        yield n


async def main():
    task = await test_yield.add_task(5, timeout=50)
    print(task.returning)


if __name__ == "__main__":
    asyncio.run(main())
