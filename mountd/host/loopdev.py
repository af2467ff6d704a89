"""Loop devices as the kernel shows them: ``LOOP_GET_STATUS64`` and sysfs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYS_BLOCK = Path("/sys/block")
LOOP_GET_STATUS64 = 0x4C05
#: struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64); lo_number,
#: lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32); file name, crypt name, key; lo_init[2].
INFO64 = struct.Struct("=5Q4I64s64s32s2Q")


@dataclass(frozen=True)
class LoopStatus:
    device: int  # st_dev of the backing file
    inode: int
    offset: int
    sizelimit: int
    flags: int


def get_status(fd: int) -> LoopStatus:
    info = INFO64.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(INFO64.size)))
    return LoopStatus(info[0], info[1], info[3], info[4], info[8])


def loop_number(node: str) -> int | None:
    name = node.removeprefix("/dev/loop")
    return int(name) if node.startswith("/dev/loop") and name.isdigit() else None


def sysfs_view(number: int) -> dict[str, Any] | None:
    """What sysfs says about ``loopN``; None when it backs nothing."""
    base = SYS_BLOCK / f"loop{number}"
    try:
        return {
            "backing_file": backing_name(base / "loop" / "backing_file"),
            "offset": int((base / "loop" / "offset").read_text()),
            "sizelimit": int((base / "loop" / "sizelimit").read_text()),
            "size_bytes": int((base / "size").read_text()) * 512,
            "ro": (base / "ro").read_text().strip() == "1",
            "dev": (base / "dev").read_text().strip(),
        }
    except (OSError, ValueError):
        return None


def same_binding(now: dict[str, Any] | None, before: dict[str, Any]) -> bool:
    keys = ("backing_file", "offset", "sizelimit", "dev")
    return now is not None and all(now[k] == before[k] for k in keys)


def loops_backed_by(path: str) -> list[str]:
    """The loop devices whose backing file is ``path`` (as the kernel names it), in number order."""
    found = []
    for entry in SYS_BLOCK.glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing_name(entry) == path:
                found.append(f"/dev/{entry.parent.parent.name}")
    return sorted(found, key=lambda n: int(n.removeprefix("/dev/loop")))


def backing_name(path: Path) -> str:
    """The kernel's name of a loop device's backing file, as Python names files (it need not be UTF-8)."""
    return os.fsdecode(path.read_bytes().rstrip(b"\n"))
