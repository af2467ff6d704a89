"""Doing something over and over in a thread for as long as a block runs: scanning every process for a secret
during a mount, sending udev events during an unmount."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def repeated(action: Callable[[], object]) -> Iterator[list[int]]:
    """Call ``action`` again and again in a thread until the block ends (the call under way finishes first).
    Yields a one-item list: how many calls have finished so far."""
    done, count = threading.Event(), [0]

    def loop() -> None:
        while not done.is_set():
            action()
            count[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        done.set()
        thread.join(timeout=60)
