"""Device-mapper as this host has it: ``dmsetup`` with or without udev, the devices that exist, and the LVs
a host's own LVM auto-activation stacked on imgmount's devices.

udev: where a udevd answers, ``dmsetup`` synchronises with it (udev makes ``/dev/mapper/NAME``). Where none
does, or the entry point said not to (:func:`allow_udev`: ``DM_DISABLE_UDEV=1`` in its environment), it runs
with ``DM_DISABLE_UDEV=1 --noudevsync`` and libdevmapper makes the node itself: libdevmapper only checks that
``/run/udev/control`` exists, and would wait for ever on a udevd that is gone (a stale socket in a container).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mountd.errors import BusyError, CommandError
from mountd.host import command
from mountd.host.blockdev import lock_out_udev
from mountd.host.dmlist import DmDevice
from mountd.host.processes import entries, text_of
from mountd.host.udevprobe import UDEV_PROBE_TIMEOUT, release_past_udev
from mountd.host.users import SYS_CLASS_BLOCK, BlockUsers

log = logging.getLogger(__name__)

DM_TIMEOUT = 60.0
#: How long a host's auto-activation of a VG on our devices may run before the teardown goes on without it
#: (LVM activating a thin pool runs thin_check first: seconds, more under emulation).
HOST_ACTIVATION_TIMEOUT = 60.0
UDEV_CONTROL = "/run/udev/control"
UDEV_RULE_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/lib/udev/rules.d", "/lib/udev/rules.d")


# --- dmsetup and udev ------------------------------------------------------------------------------------


@dataclass
class UdevSync:
    """Whether dmsetup may synchronise with udev at all: the entry point's ``Settings.dm_udev``, handed down
    once (:func:`allow_udev`) since every layer is rebuilt from its record alone."""

    allowed: bool = True


UDEV_SYNC = UdevSync()


def allow_udev(allowed: bool) -> None:
    UDEV_SYNC.allowed = allowed


def udev_running() -> bool:
    """A udevd answers on its control socket (connecting is harmless: it only accepts)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(UDEV_CONTROL)
        except OSError:
            return False
    return True


def udev_mode() -> tuple[dict[str, str], list[str]]:
    """The environment and extra ``dmsetup`` arguments: see the module docstring. udev synchronisation also
    needs the rule that tells dmsetup udev is done (95-dm-notify.rules); without it dmsetup would wait."""
    notify = any(Path(d, "95-dm-notify.rules").exists() for d in UDEV_RULE_DIRS)
    if not UDEV_SYNC.allowed or not notify or not udev_running():
        return {"DM_DISABLE_UDEV": "1"}, ["--noudevsync"]
    return {}, []


def _busy_error(device: DmDevice, users: BlockUsers) -> BusyError:
    """``device`` could not be removed: ``users`` (from :func:`release_past_udev`) held it."""
    holders = "; ".join(users.described()) or \
        f"held open by no process visible here, for {UDEV_PROBE_TIMEOUT:g} s"
    return BusyError(f"/dev/mapper/{device.name} is in use ({holders}): unmount or close it first")


def remove_past_udev(device: DmDevice, find: Callable[[], DmDevice | None], remove: Callable[[str], None],
                     busy_words: tuple[str, ...] = ("busy",)) -> None:
    """``remove`` (by name) the device ``find`` finds, once no one but udev holds it (see
    :mod:`mountd.host.udevprobe`); BusyError naming who keeps it. A CommandError whose stderr has one of
    ``busy_words`` counts as busy, any other is raised."""
    def attempt() -> bool:
        now = find()
        if now is None:
            return True
        if now.open_count > 0:
            return False
        try:
            remove(now.name)
        except CommandError as exc:
            if any(word in exc.stderr.lower() for word in busy_words):
                return False
            raise
        return True

    users = release_past_udev(device.sysname, attempt)
    if users is not None:
        raise _busy_error(device, users)


# --- LVs the host activated on our devices ---------------------------------------------------------------


def release_host_activations(nodes: Iterable[str]) -> list[str]:
    """Remove the LVs a host's LVM auto-activation mapped on our devices ``nodes``, before they are detached.

    A host's udev rules run ``vgchange -aay`` as soon as a VG's PVs appear, unless systemd/60-imgmount.rules
    is installed; such LVs would keep our devices busy for ever. Only device-mapper devices that LVM made
    (uuid "LVM-...") and that sit on nothing but ``nodes`` (or on each other) are removed, holders first (a
    thin LV, then its pool, then the pool's data and metadata LVs); one in use stays, and the detach below it
    names it. An activation still under way is waited for (bounded): udev runs it while it holds the lock of
    our whole disk, and until it is done, it holds its devices open (thin_check on a pool's metadata LV).
    """
    ours = _with_partitions(nodes)
    _wait_for_udev(ours)
    removed: list[str] = []
    env, extra = udev_mode()
    for sysname in _lvm_devices_on(ours):  # topmost first
        name = _sys_read(sysname, "dm/name")
        try:  # --retry: udev may still be probing it (it holds it open meanwhile)
            command.run(["dmsetup", "remove", "--retry", name, *extra], env=env, timeout=DM_TIMEOUT)
        except CommandError as exc:
            log.warning("the host activated %s on imgmount's devices and it is in use: %s", name, exc.message)
            break  # everything below it is still needed
        removed.append(name)
    if removed:
        log.warning("the host auto-activated %s on imgmount's devices (is 60-imgmount.rules installed?): "
                    "removed", ", ".join(removed))
    return removed


def _sysname(node: str) -> str:
    """The kernel's name of a device node: by its number, since a node libdevmapper made without udev
    (/dev/mapper/NAME) is a node of its own, not a link to /dev/dm-N."""
    try:  # /sys/dev/block/M:m links to the device's directory, and goes with it (its node may outlive it)
        rdev = os.stat(node).st_rdev
        link = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
        return os.path.basename(os.readlink(link)) if rdev else ""
    except OSError:
        return ""


def host_activations(nodes: Iterable[str]) -> list[str]:
    """The names of the dm devices a host's LVM made on our devices ``nodes`` (and on each other)."""
    return [_sys_read(sysname, "dm/name") for sysname in _lvm_devices_on(_with_partitions(nodes))]


def _with_partitions(nodes: Iterable[str]) -> set[str]:
    """The sysnames of ``nodes`` and of every partition of them: the host activates a VG on a partition of
    our disk that the mount itself never used (a PV whose LVs were not asked for)."""
    ours = {name for n in nodes if n.startswith("/dev/") and (name := _sysname(n))}
    return ours | {part for disk in ours for part in _sys_list(disk, "")
                   if part.startswith(disk) and Path(SYS_CLASS_BLOCK, disk, part, "partition").exists()}


def _wait_for_udev(ours: set[str]) -> None:
    """Until udev has finished the events of our disks (their partitions' included), or
    :data:`HOST_ACTIVATION_TIMEOUT` has passed: take and drop the lock udev holds meanwhile."""
    for disk in sorted({_whole_disk(sysname) for sysname in ours if not sysname.startswith("dm-")}):
        try:
            fd = os.open(f"/dev/{disk}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue  # gone, or not a device node of ours by that name
        try:
            lock_out_udev(fd, HOST_ACTIVATION_TIMEOUT)
        finally:
            os.close(fd)


def _whole_disk(sysname: str) -> str:
    """A partition's disk (its parent in sysfs); a disk itself."""
    path = Path(os.path.realpath(SYS_CLASS_BLOCK / sysname))
    return path.parent.name if (path / "partition").exists() else sysname


def _lvm_devices_on(ours: set[str]) -> list[str]:
    """The LVM-made dm devices (sysnames) stacked on ``ours`` alone, topmost first."""
    found: list[str] = []
    frontier = sorted(ours)
    while frontier:
        holders = {h for name in frontier for h in _sys_list(name, "holders")}
        frontier = sorted(h for h in holders - set(found)
                          if _sys_read(h, "dm/uuid").startswith("LVM-")
                          and set(_sys_list(h, "slaves")) <= ours | set(found) | holders)
        found += frontier
    return found[::-1]


def _sys_list(sysname: str, entry: str) -> list[str]:
    return entries(str(SYS_CLASS_BLOCK / sysname / entry))


def _sys_read(sysname: str, entry: str) -> str:
    return text_of(str(SYS_CLASS_BLOCK / sysname / entry))
