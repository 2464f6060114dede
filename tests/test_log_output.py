"""The command's log handler: one write per event-loop turn, nothing lost."""

from __future__ import annotations

import asyncio
import io
import logging
import threading

from qtasks.log_output import TurnBufferedHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _logger(stream: CountingStream) -> tuple[logging.Logger, TurnBufferedHandler]:
    handler = TurnBufferedHandler(stream)
    logger = logging.getLogger(f"test.log_output.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


async def test_lines_of_one_turn_are_written_together_at_its_end() -> None:
    stream = CountingStream()
    logger, _ = _logger(stream)
    for i in range(100):
        logger.info("task %d done", i)
    assert stream.getvalue() == ""  # still this turn
    await asyncio.sleep(0)
    assert stream.getvalue().splitlines() == [f"task {i} done" for i in range(100)]
    assert stream.writes == 1
    logger.info("next turn")
    await asyncio.sleep(0)
    assert stream.getvalue().splitlines()[-1] == "next turn" and stream.writes == 2


def test_without_a_loop_or_from_a_thread_a_line_is_written_at_once() -> None:
    stream = CountingStream()
    logger, _ = _logger(stream)
    logger.info("start-up")
    assert stream.getvalue() == "start-up\n"
    thread = threading.Thread(target=logger.warning, args=("from a thread",))
    thread.start()
    thread.join()
    assert stream.getvalue().splitlines() == ["start-up", "from a thread"]


async def test_flush_writes_what_is_left() -> None:
    stream = CountingStream()
    logger, handler = _logger(stream)
    logger.error("before exit")
    handler.flush()  # what logging.shutdown does at exit
    assert stream.getvalue() == "before exit\n"
