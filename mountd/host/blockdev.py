"""Block devices the engine claims: an exclusive open, udev's device lock, and waiting for kernel uevents."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import pyudev

from mountd.errors import FailedError

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


_THREAD = threading.local()


def _udev_context() -> Any:
    """This thread's libudev context (libudev objects are for one thread each). Made once: each new one
    runs ``ldconfig -p`` (pyudev finds libudev with ctypes.util.find_library), a fork of the daemon whose
    copies of our descriptors a scan of /proc could take for another user of a device we detach."""
    context = getattr(_THREAD, "udev", None)
    if context is None:
        context = _THREAD.udev = pyudev.Context()
    return context


class BlockEvents:
    """Kernel block uevents (netlink: needs no udevd), from the moment of creation: create it first, then act,
    then :meth:`wait`. The socket closes when the object is freed (pyudev's Monitor has no stop())."""

    def __init__(self) -> None:
        self._monitor: Any = pyudev.Monitor.from_netlink(_udev_context(), source="kernel")
        self._monitor.filter_by("block")
        self._monitor.start()

    def wait(self, condition: Callable[[], bool], timeout: float, also: int | None = None) -> bool:
        """Re-check ``condition`` on each block uevent, when ``also`` (a pidfd) becomes readable, and every
        TICK s, until it holds (True) or ``timeout`` passes (False). ``also`` wakes us once only."""
        deadline = time.monotonic() + timeout
        fds = [self._monitor.fileno(), *([also] if also is not None else [])]
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return condition()
            ready, _, _ = select.select(fds, [], [], min(remaining, TICK))
            if also in ready:
                fds.remove(also)  # a pidfd stays readable once the process is gone
            if fds[0] in ready:
                for _ in range(1000):  # drain what arrived; bounded even under an event flood
                    if self._monitor.poll(timeout=0) is None:
                        break
        return True
