"""Block devices the engine claims: an exclusive open, and udev's device lock."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import time

from .errors import FailedError

UDEV_LOCK_TIMEOUT = 10.0
TICK = 0.05


def claim_exclusive(node: str) -> int | None:
    """An O_EXCL open, or None (EBUSY) while the device or a partition of it is mounted or stacked on."""
    try:
        return os.open(node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return None
        raise FailedError(f"cannot open {node}: {exc.strerror}") from None


def lock_out_udev(fd: int, timeout: float = UDEV_LOCK_TIMEOUT) -> bool:
    """flock(LOCK_EX) on a whole-disk device: udevd holds LOCK_SH on it (and has it open) while it processes
    one of its events, and leaves a device locked this way alone (systemd.io/BLOCK_DEVICE_LOCKING). Nothing
    signals when udev lets go, so the lock is polled with a deadline. Released when ``fd`` is closed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            select.select([], [], [], TICK)
