"""Which filesystem (or other signature) a volume holds: type, label, UUID, read by ``blkid``.

blkid needs a file, and the volume may live inside a qcow2 read through NBD. So the probe copies the volume's
head and tail (where every superblock blkid knows lives: ext* at 1 KiB, btrfs at 64 KiB, xfs/vfat/ntfs/LUKS
at 0, iso9660 at 32 KiB, md and others near the end) into a sparse file of the volume's exact size, and runs
``blkid -p`` (low-level probing, no cache) on that. Nothing of the image is mounted or attached.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

from . import command
from .blockio import BlockReader

HEAD = 2 << 20
TAIL = 1 << 20
BLKID_NOTHING_FOUND = 2


@dataclass(frozen=True)
class Signature:
    type: str  # "ext4", "xfs", "LVM2_member", "swap", "crypto_LUKS", ...
    usage: str  # "filesystem", "raid", "crypto", "other"
    label: str = ""
    uuid: str = ""
    version: str = ""


def probe(reader: BlockReader) -> Signature | None:
    """The signature on ``reader``, or None if blkid recognises nothing (or finds two that conflict)."""
    if reader.size == 0:
        return None
    with tempfile.NamedTemporaryFile(prefix="imgmount-probe-") as tmp:
        _sparse_copy(reader, tmp.fileno())
        result = command.run(["blkid", "-p", "-o", "export", "-c", "/dev/null", tmp.name], check=False)
    if result.status != 0:
        return None  # 2: nothing found; 8: ambivalent (two signatures): neither is safe to mount
    values = {key: _unescape(value) for key, value in
              (line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)}
    if "TYPE" not in values:
        return None
    return Signature(
        type=values["TYPE"],
        usage=values.get("USAGE", "other"),
        label=values.get("LABEL", ""),
        uuid=values.get("UUID", ""),
        version=values.get("VERSION", ""),
    )


def _unescape(value: str) -> str:
    """``blkid -o export`` puts a backslash before characters that are special to a shell."""
    return re.sub(r"\\(.)", r"\1", value)


def _sparse_copy(reader: BlockReader, fd: int) -> None:
    size = reader.size
    os.ftruncate(fd, size)
    head = min(size, HEAD)
    os.pwrite(fd, reader.read(0, head), 0)
    tail_start = max(head, size - TAIL) & ~4095  # keep the tail 4 KiB aligned, as on the device
    if tail_start < size:
        os.pwrite(fd, reader.read(tail_start, size - tail_start), tail_start)
