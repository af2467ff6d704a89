"""Which filesystem (or other signature) a volume holds: type, label, UUID, read by ``blkid``.

blkid needs a file, and the volume may live inside a qcow2 read through NBD. So the probe copies the volume's
head and tail (where every superblock blkid knows lives: ext* at 1 KiB, btrfs at 64 KiB, xfs/vfat/ntfs/LUKS
at 0, iso9660 at 32 KiB, md and others near the end) into a sparse file of the volume's exact size, and runs
``blkid -p`` (low-level probing, no cache) on that. Nothing of the image is mounted or attached.

The sparse file is a memfd (an anonymous tmpfs file, handed to blkid as ``/proc/self/fd/N``), not a file in
the temp directory: a volume may be as large as anything QEMU accepts (a qcow2 of several PiB), and a file
system caps the size of a file (ext4 at 16 TiB, so a 20 TiB volume failed with EFBIG), while tmpfs allows
any size a block device can have (2^63 - 1 bytes). Only the copied head and tail take memory (3 MiB at most),
a memfd needs no writable directory, and it disappears with the last descriptor, even if we are killed.
blkid's ``--offset``/``--size`` cannot replace the full-size file: they choose a window of a file, and the
probes that read near the end (md, ZFS, the RAID formats) would then read past the end of a short one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mountd.host import command
from mountd.image import recovery
from mountd.image.blockio import BlockReader

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
    recovery: str = ""  # a journal or log to replay: mountd.image.recovery.PENDING or ELSEWHERE ("": none)

    @property
    def needs_recovery(self) -> bool:
        return bool(self.recovery)


def probe(reader: BlockReader) -> Signature | None:
    """The signature on ``reader``, or None if blkid recognises nothing (or finds two that conflict)."""
    if reader.size == 0:
        return None
    fd = os.memfd_create("imgmount-probe", os.MFD_CLOEXEC)
    try:
        _sparse_copy(reader, fd)
        result = command.run(["blkid", "-p", "-o", "export", "-c", "/dev/null", f"/proc/self/fd/{fd}"],
                             check=False, pass_fds=(fd,))
    finally:
        os.close(fd)
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
        recovery=recovery.pending(values["TYPE"], reader),
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
