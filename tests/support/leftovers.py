"""What a test run can leave behind: loop and nbd devices, device-mapper tables, mounts, QEMU processes and
FUSE filesystem drivers, and descriptors of this process on block devices."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mountd.host import dmlist


@dataclass(frozen=True)
class Snapshot:
    items: frozenset[str]

    def new_since(self, before: Snapshot) -> list[str]:
        return sorted(self.items - before.items)


def snapshot() -> Snapshot:
    return Snapshot(frozenset(_loops() | _nbds() | _dm_devices() | _mounts() | _qemu_processes()
                              | device_descriptors()))


def _loops() -> set[str]:
    found = set()
    for dev in Path("/sys/block").glob("loop*"):
        backing = dev / "loop" / "backing_file"
        if backing.exists():
            found.add(f"loop device /dev/{dev.name} -> {backing.read_text().strip()}")
    return found


def _nbds() -> set[str]:
    return {f"nbd device /dev/{d.name} (pid {(d / 'pid').read_text().strip()})"
            for d in Path("/sys/block").glob("nbd*") if (d / "pid").exists()}


def _dm_devices() -> set[str]:
    return {f"device-mapper device {d.name} (uuid {d.uuid or 'none'})" for d in dmlist.dm_devices()}


def _mounts() -> set[str]:
    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        source, mountpoint = fields[sep + 2], fields[4]
        if source.startswith(("/dev/loop", "/dev/nbd", "/dev/mapper", "/dev/dm-")) or fields[sep + 1] == "fuse":
            found.add(f"mount {source} on {mountpoint}")
    return found


def device_descriptors() -> set[str]:
    """This process's open descriptors on block devices (an engine working in-process holds them while it
    builds a mount, and must let go when it is done)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISBLK(os.stat(f"/proc/self/fd/{fd}").st_mode):
                found.add(f"descriptor {fd} of this process on {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue  # the listing's own descriptor, or one closed meanwhile
    return found


SERVERS = ("qemu-nbd", "qemu-storage-daemon", "qemu-system", "ntfs-3g", "mount.exfat-fuse", "fusefat")


def _qemu_processes() -> set[str]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = os.path.basename(cmd[0].decode(errors="replace")) if cmd and cmd[0] else ""
        if name.startswith(SERVERS):
            found.add(f"process {name} pid {pid}: {b' '.join(cmd).decode(errors='replace')[:160]}")
    return found


def ours(left: list[str], *markers: object) -> list[str]:
    """Those of ``left`` that name one of ``markers`` (a test's image, state directory, mount root): what
    other tests running on this machine at the same time leave for a moment is theirs."""
    return [x for x in left if any(str(m) in x for m in markers)]
