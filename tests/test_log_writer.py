"""The log line writer: INFO lines in batches (one write for many webhooks), warnings at once,
every write whole lines of at most PIPE_BUF bytes, nothing lost at a flush."""

from __future__ import annotations

import asyncio
import io

from relay.logs import FLUSH_DELAY, PIPE_BUF, LineWriter


class Recording(io.BytesIO):
    """A binary stream that remembers each write (and each flush that followed it)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.flushed = asyncio.Event()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return super().write(data)

    def flush(self) -> None:
        self.flushed.set()


async def test_info_lines_wait_for_one_batch_and_a_warning_writes_them_first() -> None:
    """Lines logged at INFO inside the event loop are held; a WARNING writes them and itself,
    in order, in one write."""
    raw = Recording()
    writer = LineWriter(raw)

    writer.info(b'{"event":"webhook.accepted","n":1}')
    writer.info(b'{"event":"webhook.accepted","n":2}')
    held = list(raw.writes)
    writer.warning(b'{"event":"broker.disconnected"}')

    assert held == []
    assert raw.writes == [
        (
            b'{"event":"webhook.accepted","n":1}\n'
            b'{"event":"webhook.accepted","n":2}\n'
            b'{"event":"broker.disconnected"}\n'
        )
    ]


async def test_held_lines_are_written_after_the_flush_delay() -> None:
    """An INFO line alone goes out by itself once ``FLUSH_DELAY`` has passed."""
    raw = Recording()
    writer = LineWriter(raw)

    writer.info(b'{"event":"webhook.accepted"}')
    async with asyncio.timeout(FLUSH_DELAY * 20):
        await raw.flushed.wait()

    assert raw.writes == [b'{"event":"webhook.accepted"}\n']


def test_without_an_event_loop_each_line_is_written_at_once() -> None:
    """Where no event loop runs (start-up, command-line tools), a line is written at once."""
    raw = Recording()
    writer = LineWriter(raw)

    writer.info(b'{"event":"relay.starting"}')

    assert raw.writes == [b'{"event":"relay.starting"}\n']


async def test_batches_are_written_in_whole_lines_of_at_most_pipe_buf() -> None:
    """A batch that reaches PIPE_BUF bytes is written at once, split at line ends into writes
    of at most PIPE_BUF bytes (atomic on a pipe shared by several workers); no byte is lost."""
    raw = Recording()
    writer = LineWriter(raw)
    lines = [b'{"event":"webhook.accepted","n":%d,"pad":"%s"}' % (n, b"x" * 300) for n in range(40)]

    for line in lines:
        writer.info(line)
    writer.flush()

    assert b"".join(raw.writes) == b"".join(line + b"\n" for line in lines)
    assert len(raw.writes) > 1
    assert all(len(w) <= PIPE_BUF and w.endswith(b"\n") for w in raw.writes)
