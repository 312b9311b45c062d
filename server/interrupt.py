"""Ctrl-C (SIGINT) during a command that writes in batches (`import`, `coupons generate`):
the batch being written is finished and the command stops after it, saying what it
wrote. Raised at an arbitrary moment, KeyboardInterrupt would print a traceback and could
land after a batch committed but before the command counted it (codes stored but never
written to their file)."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

# The status a shell reports for a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED_STATUS = 128 + signal.SIGINT


class StopRequest:
    """Whether Ctrl-C was pressed; the command looks between batches."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def stop_between_batches() -> Iterator[StopRequest]:
    """A second Ctrl-C interrupts at once, as usual (whoever insists is not kept waiting)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request      # signal handlers can only be set on the main thread
        return

    def on_interrupt(signum, frame) -> None:
        request.requested = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(Exception):
    """Ctrl-C was pressed: raised before the next batch is written, never during one."""


class StopBeforeWrites:
    """A database whose write_sync raises Interrupted once Ctrl-C was pressed, so a command
    whose loops write batch after batch stops between two of them."""

    def __init__(self, db, stop: StopRequest) -> None:
        self._db, self._stop = db, stop

    def write_sync(self, fn, *args, **kwargs):
        if self._stop.requested:
            raise Interrupted
        return self._db.write_sync(fn, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._db, name)
