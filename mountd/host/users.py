"""Who holds a block device, a file or a mountpoint: one typed answer, read from sysfs, mountinfo and /proc.

Each layer words its own "busy" message from it (a loop device, an nbd device, a device-mapper LV, a FUSE
export, a mountpoint); nothing here decides what is ours or takes an action. Processes that vanish and
devices removed while we look are skipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from mountd.errors import MountdError
from mountd.host.holders import Holder, files_usage
from mountd.host.loopdev import backing_name, loops_backed_by
from mountd.host.mountinfo import mountinfo
from mountd.host.processes import entries, link_target, program_name, text_of

SYS_BLOCK = Path("/sys/block")
SYS_CLASS_BLOCK = Path("/sys/class/block")
MAX_FDS_SCANNED = 1 << 16  # per process
MAX_MAPS_BYTES = 8 << 20  # per process


# ---- block devices ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stacked:
    """A device the kernel stacked on ours (``holders/`` in sysfs): device-mapper, md, bcache."""

    sysname: str  # dm-2, md126
    dm_name: str  # "" for what is not device-mapper
    on: str  # the node it sits on

    def __str__(self) -> str:
        return f"device-mapper {self.dm_name} ({self.sysname})" if self.dm_name else self.sysname


@dataclass(frozen=True)
class BlockUsers:
    """Every way a block device (or one of its partitions) is in use."""

    mounts: tuple[tuple[str, str], ...] = ()  # (node, mountpoint)
    stacked: tuple[Stacked, ...] = ()
    loops: tuple[tuple[str, str], ...] = ()  # (loop device, the node it is backed by)
    openers: tuple[tuple[str, Holder], ...] = ()  # (node, a process that has it open)

    def __bool__(self) -> bool:
        return bool(self.mounts or self.stacked or self.loops or self.openers)

    def described(self) -> list[str]:
        """Each user in a phrase that names the node it holds (a layer may word its own instead)."""
        return [*(f"{node} mounted on {mountpoint}" for node, mountpoint in self.mounts),
                *(f"{s} on {s.on}" for s in self.stacked),
                *(f"loop device {loop} on {on}" for loop, on in self.loops),
                *(f"{h.program} (pid {h.pid}) has {node} open" for node, h in self.openers)]


def block_users(name: str, *, ignore_pids: Collection[int] = ()) -> BlockUsers:
    """Who holds block device ``name`` (``nbd3``, ``loop2``, ``dm-2``) or one of its partitions: mounts,
    stacked devices, loop devices on it, processes that have it open (never this one, nor ``ignore_pids``,
    nor a program of ours between its fork and its exec)."""
    names = [name, *partitions_of(name)]
    devnums = {}
    for n in names:
        with contextlib.suppress(OSError):  # a partition removed while we look
            devnums[(SYS_CLASS_BLOCK / n / "dev").read_text().strip()] = n
    mounts = tuple((f"/dev/{devnums[m.dev]}", m.mountpoint) for m in mountinfo() if m.dev in devnums)
    stacked = tuple(Stacked(h.name, text_of(str(h / "dm" / "name")), f"/dev/{n}")
                    for n in names for h in sorted((SYS_CLASS_BLOCK / n / "holders").glob("*")))
    nodes = {f"/dev/{n}" for n in names}
    loops = tuple((loop, on) for on in sorted(nodes) for loop in loops_backed_by(on))
    openers: tuple[tuple[str, Holder], ...] = ()
    with contextlib.suppress(OSError, MountdError):  # a node that went away meanwhile
        usages = files_usage(sorted(p for p in nodes if os.path.exists(p)), ignore_pids=ignore_pids)
        openers = tuple((u.path, h) for u in usages for h in u.holders)
    return BlockUsers(mounts, stacked, loops, openers)


def partitions_of(name: str) -> list[str]:
    return sorted(p.name for p in (SYS_CLASS_BLOCK / name).glob(f"{name}*") if (p / "partition").exists())


# ---- files -----------------------------------------------------------------------------------------------


def openers_by_name(path: str) -> list[tuple[int, str]]:
    """(pid, program) of the processes with ``path`` open, by the fd link text alone: nothing is stat-ed,
    so a dead FUSE mount (ENOTCONN) does not stop the scan."""
    found = []
    for pid in sorted(filter(str.isdigit, entries("/proc")), key=int):
        if any(link_target(f"/proc/{pid}/fd/{fd}") == path for fd in entries(f"/proc/{pid}/fd")):
            program = program_name(int(pid))
            if program is not None:
                found.append((int(pid), program))
    return found


# ---- mountpoints -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountUser:
    pid: int
    program: str
    how: str  # "working directory", "root directory", "open file", "mapped file"

    def __str__(self) -> str:
        return f"{self.program}, pid {self.pid} ({self.how})"


def mountpoint_users(path: str) -> list[MountUser]:
    """Processes whose working or root directory, open files or mapped files lie under ``path`` (as this
    mount namespace sees it). One pass over /proc."""
    top = os.path.normpath(path)
    users = []
    for pid in sorted(filter(str.isdigit, entries("/proc")), key=int):
        how = _how(pid, top)
        program = program_name(int(pid)) if how else None
        if how and program:
            users.append(MountUser(int(pid), program, how))
    return users


def kernel_users_under(top: str) -> list[str]:
    """Users no process scan shows: loop devices and swap files backed by a file under ``top``."""
    found = []
    for entry in sorted(SYS_BLOCK.glob("*/loop/backing_file")):
        with contextlib.suppress(OSError):
            if under(backing_name(entry), top):
                found.append(f"loop device /dev/{entry.parent.parent.name}")
    with contextlib.suppress(OSError), open("/proc/swaps", encoding="utf-8", errors="replace") as f:
        found += [f"swap file {line.split()[0]}" for line in f.read().splitlines()[1:]
                  if line.split() and under(line.split()[0], top)]
    return found


def under(path: str, top: str) -> bool:
    path = path.removesuffix(" (deleted)")
    return path == top or path.startswith(top.rstrip("/") + "/")


def _how(pid: str, top: str) -> str | None:
    if _link_under(f"/proc/{pid}/cwd", top):
        return "working directory"
    if _link_under(f"/proc/{pid}/root", top):
        return "root directory"
    fds = entries(f"/proc/{pid}/fd")[:MAX_FDS_SCANNED]
    if any(_link_under(f"/proc/{pid}/fd/{fd}", top) for fd in fds):
        return "open file"
    return "mapped file" if _maps_under(pid, top) else None


def _link_under(link: str, top: str) -> bool:
    target = link_target(link)  # "" once the process or fd is gone, or not ours to look at
    return bool(target) and under(target, top)


def _maps_under(pid: str, top: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            data = f.read(MAX_MAPS_BYTES)
    except OSError:
        return False
    for line in data.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and under(os.fsdecode(parts[5]), top):
            return True
    return False
