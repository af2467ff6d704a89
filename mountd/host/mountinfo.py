"""``/proc/self/mountinfo`` (proc(5)): what is mounted where, as this mount namespace sees it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``, paths unescaped."""

    mount_id: int
    parent_id: int
    dev: str  # "major:minor" of the filesystem (an anonymous 0:N for btrfs)
    root: str
    mountpoint: str
    options: tuple[str, ...]  # per-mount options: ro/rw, nosuid, nodev, ...
    fstype: str
    source: str
    super_options: tuple[str, ...]  # the filesystem's own: norecovery, rescue=nologreplay, ...


def _unescape(field: bytes) -> str:
    r"""The kernel writes space, tab, newline and backslash in paths as ``\040 \011 \012 \134``."""
    out = bytearray()
    i = 0
    while i < len(field):
        chunk = field[i + 1:i + 4]
        if field[i] == 0x5C and len(chunk) == 3 and all(0x30 <= c <= 0x37 for c in chunk):
            out.append(int(chunk, 8) & 0xFF)
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_mountinfo(data: bytes) -> list[MountEntry]:
    """Parse mountinfo text; lines that do not have the documented shape are skipped."""
    entries = []
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            fstype, source, super_options = fields[sep + 1:sep + 4]
            entries.append(MountEntry(
                int(fields[0]), int(fields[1]), fields[2].decode("ascii"), _unescape(fields[3]),
                _unescape(fields[4]), tuple(fields[5].decode("ascii").split(",")), _unescape(fstype),
                _unescape(source), tuple(_unescape(super_options).split(","))))
        except (ValueError, UnicodeDecodeError):
            continue
    return entries


def mountinfo() -> list[MountEntry]:
    with open("/proc/self/mountinfo", "rb") as f:
        return parse_mountinfo(f.read())


def mounted_at(path: str, entries: Iterable[MountEntry]) -> list[MountEntry]:
    return [e for e in entries if e.mountpoint == path]
