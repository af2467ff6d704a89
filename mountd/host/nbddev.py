"""nbd devices as the kernel shows them (sysfs), and loading the ``nbd`` module."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mountd.errors import CommandError, UnsupportedError
from mountd.host import command
from mountd.host.users import SYS_BLOCK, SYS_CLASS_BLOCK

SECTOR = 512  # sysfs start/size unit, whatever the device's logical sector size


@dataclass(frozen=True)
class NbdModule:
    max_part: int  # as the kernel rounded it (16 reads 31); 0: no partition nodes (use loop devices)
    nbds_max: int


def ensure_nbd_module(min_devices: int = 16) -> NbdModule:
    """Load ``nbd`` if it is not loaded; a module already loaded keeps the parameters it has."""
    params = Path("/sys/module/nbd/parameters")
    if not Path("/sys/module/nbd").is_dir():
        try:
            command.run(["modprobe", "nbd", "max_part=16", f"nbds_max={max(min_devices, 16)}"])
        except CommandError as exc:
            raise UnsupportedError("this kernel has no nbd module: use --backend fuse") from exc
    return NbdModule(read_int(params / "max_part"), read_int(params / "nbds_max"))


# --- kernel state ------------------------------------------------------------------------------------------


def read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def _tgid(tid: int) -> int | None:
    try:
        status = Path(f"/proc/{tid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^Tgid:\s+(\d+)", status, re.M)
    return int(found.group(1)) if found else None


def server_pid(name: str) -> int | None:
    """The process serving ``nbdN``: sysfs ``pid`` is its client thread's id."""
    tid = read_int(SYS_BLOCK / name / "pid", -1)
    return _tgid(tid) if tid > 0 else None


def device_size(name: str) -> int:
    return read_int(SYS_CLASS_BLOCK / name / "size") * SECTOR


def logical_block_size(name: str) -> int:
    """The device's logical sector size: what the kernel's partition scan counts LBAs in."""
    return read_int(SYS_BLOCK / name / "queue" / "logical_block_size", SECTOR)


def is_free(name: str) -> bool:
    """Free as the design defines it: no server attached (no ``pid``) and a size of 0."""
    return not (SYS_BLOCK / name / "pid").exists() and device_size(name) == 0


def nbd_devices() -> list[str]:
    names = [p.name for p in SYS_BLOCK.glob("nbd*") if re.fullmatch(r"nbd\d+", p.name)]
    return sorted(names, key=lambda n: int(n[3:]))
