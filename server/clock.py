"""The server's notion of now: the system clock, or a configured start that runs forward."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone


class Clock:
    def __init__(self, start: datetime | None = None):
        if start is not None and start.tzinfo is None:
            raise ValueError("clock.start needs a UTC offset")
        self._start = start
        self._t0 = time.monotonic()

    def now(self) -> datetime:
        if self._start is None:
            return datetime.now(timezone.utc)
        return (self._start + timedelta(seconds=time.monotonic() - self._t0)).astimezone(timezone.utc)

    def set(self, moment: datetime) -> None:
        """Jump to `moment` and run on from there (simulated time in tests and demos)."""
        if moment.tzinfo is None:
            raise ValueError("the moment needs a UTC offset")
        self._start = moment
        self._t0 = time.monotonic()
