"""nbd devices for the VM lane: claim a free one, attach an image with ``qemu-nbd``, and wait for the kernel.

Waiting is by kernel uevent (a netlink monitor, which needs no udevd): start the monitor before the action,
check the current state, then re-check on each block event until a deadline. Inotify is no use here: sysfs
(kernfs) sends no inotify events for the directories the kernel adds, and a watch on devtmpfs /dev only gives
node names, with no sign that a rescan (which removes and re-adds every partition) is over.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyudev

from imgmount_testkit.images import run

SYS_BLOCK = Path("/sys/block")
ATTACH_TIMEOUT = 30.0
DETACH_TIMEOUT = 30.0


@dataclass(frozen=True)
class KernelPartition:
    number: int
    start: int  # 512-byte units, whatever the device's logical sector size (sysfs convention)
    size: int  # 512-byte units


def _number(name: str) -> int:
    return int(name.removeprefix("nbd"))


def is_free(name: str) -> bool:
    """Free as the design defines it: no server attached (no ``pid``) and a size of 0."""
    sys_dev = SYS_BLOCK / name
    return not (sys_dev / "pid").exists() and (sys_dev / "size").read_text().strip() == "0"


def free_devices() -> list[str]:
    """Names (``nbd3``) of the free nbd devices, lowest first."""
    names = [p.name for p in SYS_BLOCK.glob("nbd*") if re.fullmatch(r"nbd\d+", p.name)]
    return [n for n in sorted(names, key=_number) if is_free(n)]


def kernel_partitions(name: str) -> dict[int, KernelPartition]:
    """The partitions the kernel shows for ``name`` (``nbd3``): its ``nbd3pK`` sysfs children."""
    found = {}
    for part in (SYS_BLOCK / name).glob(f"{name}p*"):
        try:
            number = int((part / "partition").read_text())
            found[number] = KernelPartition(number, int((part / "start").read_text()),
                                            int((part / "size").read_text()))
        except OSError:  # ENOENT/ENODEV: removed while we read (a rescan is under way); the caller waits
            continue
    return found


def device_size(name: str) -> int:
    """Size in bytes (sysfs ``size`` is always in 512-byte units)."""
    return int((SYS_BLOCK / name / "size").read_text()) * 512


class Uevents:
    """Kernel block uevents from the moment of creation: create it before the action you wait for.

    The netlink socket closes when the object is freed (pyudev's Monitor has no stop()).
    """

    def __init__(self) -> None:
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self._monitor.filter_by("block")
        self._monitor.start()

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Re-check ``condition`` on each block event until it holds (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return condition()
            self._monitor.poll(timeout=remaining)
        return True


def _server_pidfd(name: str) -> int | None:
    """A pidfd on the qemu-nbd process serving ``name``, to wait for its exit (sysfs gives a thread id)."""
    try:
        tid = (SYS_BLOCK / name / "pid").read_text().strip()
        status = Path(f"/proc/{tid}/status").read_text()
    except FileNotFoundError:
        return None
    tgid = re.search(r"^Tgid:\s+(\d+)", status, re.M)
    try:
        return os.pidfd_open(int(tgid.group(1)) if tgid else int(tid))
    except ProcessLookupError:
        return None


def detach(device: str, events: Uevents) -> None:
    """``qemu-nbd -d`` and check that the device is really free: ``-d`` reports success even when the
    device stays held. Also waits for the qemu-nbd server to exit, so no process outlives the test."""
    name = Path(device).name
    pidfd = _server_pidfd(name)
    try:
        run(["qemu-nbd", "-d", device])
        if not events.wait_until(lambda: is_free(name), DETACH_TIMEOUT):
            raise AssertionError(f"{device} is still held after qemu-nbd -d (pid file or non-zero size)")
        if pidfd is not None and not select.select([pidfd], [], [], DETACH_TIMEOUT)[0]:
            raise AssertionError(f"the qemu-nbd server of {device} did not exit after qemu-nbd -d")
    finally:
        if pidfd is not None:
            os.close(pidfd)


@contextlib.contextmanager
def attached(image: Path, fmt: str, device: str) -> Iterator[Uevents]:
    """Serve ``image`` (format pinned, read-only) on ``device``; detach and verify on the way out.

    Yields the uevent monitor, started before the connect, for further waits on this device.
    """
    name = Path(device).name
    events = Uevents()
    try:
        run(["qemu-nbd", "-r", "-c", device, "-f", fmt, str(image)])
        connected = events.wait_until(lambda: device_size(name) > 0, ATTACH_TIMEOUT)
        assert connected, f"{device} did not get a size within {ATTACH_TIMEOUT} s of qemu-nbd -c"
        yield events
    finally:
        detach(device, events)  # also after a failed connect: it may have got half-way
