"""The thread pool of the offset loops, which a Ctrl-C stops within one short step.

Leaving a ``ThreadPoolExecutor`` block waits for every task it was given. So
when the caller's thread raised (``KeyboardInterrupt`` on Ctrl-C, or SIGTERM
turned into an exception by the command line), the work went on to the end, minutes for a wide
search window, and a second Ctrl-C then interrupted the interpreter's own
wait for the threads with a traceback. :func:`stoppable_pool` cancels the
tasks not yet started and sets an event that running tasks read between
their steps; the caller's exception then comes out within one step.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["stoppable_pool", "NEVER"]


class _Never:
    """An event that is never set: what a task run in the caller's own thread is given."""

    @staticmethod
    def is_set():
        return False


NEVER = _Never()


@contextlib.contextmanager
def stoppable_pool(workers):
    """Yield ``(pool, stop)``: a pool of ``workers`` threads and the event its tasks read between steps.

    On any exception raised in the block, ``KeyboardInterrupt`` included,
    ``stop`` is set and the tasks not yet started are cancelled before the
    running ones are waited for; then the exception goes on. A task that sees
    ``stop`` set returns at once: its partial result is never read.
    """
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            yield pool, stop
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
