"""What every `loyalty` command does when the reader of its standard output goes away
(`loyalty export ledger | head`): stop writing and exit quietly, as a program killed by
SIGPIPE would, rather than with a BrokenPipeError traceback.

Python ignores SIGPIPE, so a write to a pipe nobody reads raises BrokenPipeError; the
Python documentation's note on SIGPIPE gives this handling: catch it at the top and point
standard output at /dev/null, since the interpreter flushes it once more at exit and would
otherwise print "Exception ignored ... BrokenPipeError".
"""
from __future__ import annotations

import functools
import os
import select
import signal
import sys
from collections.abc import Callable

# The status a shell reports for a command killed by SIGPIPE (`yes | head`; 141 on Linux).
# Not 1, which `audit verify` and `rules check` use for "problems found".
BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


def quiet_when_reader_goes(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            status = main(*args, **kwargs)
            # Whatever is still buffered fails here, where it is handled, not at exit.
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            if not _stdout_reader_gone():
                raise  # a socket or another pipe: a real failure, not the reader leaving
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return BROKEN_PIPE_STATUS
    return run


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe or socket whose reading end was closed (poll
    reports an error condition on the writing end then)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
