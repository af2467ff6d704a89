"""Releasing a block device that udev may be probing: device-mapper, dm-crypt and md refuse to let go of a
device anyone has open, and udev opens each device for every event it processes.

udev's events of a device come late under load: the device looks free, then a worker opens it (to take its
lock and probe it) just as ``dmsetup remove``, ``cryptsetup close`` or ``mdadm --stop`` runs, which then fails
"busy" with no user left to name (seen in the VM lane with two guests on two cores). So a release is tried
again while nothing but udev holds the device, letting udev's event finish first (its lock), for at most
:data:`UDEV_PROBE_TIMEOUT`; any other user stops it at once, by name.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable

from mountd.host.blockdev import TICK, lock_out_udev
from mountd.host.processes import proc_state, program_name
from mountd.host.users import BlockUsers, block_users

#: A udev worker's program (systemd-udevd, or udevadm that Debian links it to): its holding a device open, or
#: a program's it started, is udev processing an event.
UDEV_PROGRAMS = frozenset({"systemd-udevd", "udevadm", "udevd"})

#: How long a device that only udev holds (or no one we can name: a probe that ended meanwhile) is waited
#: for: udev takes no lock on device-mapper devices, and under load its rules for one event can run for
#: seconds.
UDEV_PROBE_TIMEOUT = 30.0


def release_past_udev(sysname: str, attempt: Callable[[], bool],
                      timeout: float = UDEV_PROBE_TIMEOUT) -> BlockUsers | None:
    """Call ``attempt`` (True: released, or gone; False: busy) until it succeeds or something other than
    udev holds ``sysname`` (``dm-3``, ``md200``). None once released; else the users that kept it (empty:
    held open by no process we can see, past ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        let_udev_finish(sysname)
        if attempt():
            return None
        users = block_users(sysname)
        if time.monotonic() > deadline or not udev_only(users):
            return users
        select.select([], [], [], TICK)


def let_udev_finish(sysname: str) -> None:
    """udev holds a device's lock while it processes an event of it: take and drop the lock."""
    with contextlib.suppress(OSError):
        fd = os.open(f"/dev/{sysname}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            lock_out_udev(fd)
        finally:
            os.close(fd)


def udev_only(users: BlockUsers) -> bool:
    """Nothing but udev (or no one we can name any more: a probe that ended meanwhile) holds the device."""
    kernel_users = users.mounts or users.stacked or users.loops
    return not kernel_users and all(is_udev(h.pid) for _, h in users.openers)


def is_udev(pid: int) -> bool:
    """``pid`` is a udev worker, or a program one runs for its rules (``mdadm --detail``, ``lvm pvscan``)."""
    state = proc_state(pid)
    return state is not None and any(program_name(p) in UDEV_PROGRAMS for p in (pid, state.ppid))
