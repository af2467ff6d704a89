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
One kind of volume says where blkid must look beyond them: BitLocker, whose boot sector points at its FVE
metadata blocks (Windows 10 puts them about half-way into the volume); the 4 KiB at each is copied too.
blkid's ``--offset``/``--size`` cannot replace the full-size file: they choose a window of a file, and the
probes that read near the end (md, ZFS, the RAID formats) would then read past the end of a short one.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from mountd.host import command
from mountd.image import recovery
from mountd.image.blockio import BlockReader

HEAD = 2 << 20
TAIL = 1 << 20
POINTED = 4096  # what is copied at each place a boot sector points to
BITLOCKER_GUID = bytes.fromhex("3bd66749292ed84a8399f6a339e3d001")  # 4967D63B-2E29-4AD8-8399-F6A339E3D001
#: Where each kind of BitLocker boot sector keeps its FVE metadata offsets (u64, little-endian): Vista one at
#: 0x38, Windows 7+ three at 0xB0 after the GUID at 0xA0, BitLocker To Go three at 0x1B8 after it at 0x1A8.
BITLOCKER_OFFSETS = ((b"\xeb\x52\x90-FVE-FS-", None, 0x38, 1), (b"\xeb\x58\x90-FVE-FS-", 0xA0, 0xB0, 3),
                     (b"\xeb\x58\x90MSWIN4.1", 0x1A8, 0x1B8, 3))
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
    first = reader.read(0, head)
    os.pwrite(fd, first, 0)
    tail_start = max(head, size - TAIL) & ~4095  # keep the tail 4 KiB aligned, as on the device
    if tail_start < size:
        os.pwrite(fd, reader.read(tail_start, size - tail_start), tail_start)
    for at in _pointed_to(first[:512]):
        start = at & ~(POINTED - 1)
        if head <= start < tail_start:
            os.pwrite(fd, reader.read(start, min(POINTED, size - start)), start)


def _pointed_to(boot: bytes) -> list[int]:
    """The places beyond head and tail that the boot sector tells blkid to read: BitLocker's metadata."""
    for magic, guid_at, offsets_at, count in BITLOCKER_OFFSETS:
        if boot[:11] == magic and len(boot) >= offsets_at + 8 * count and (
                guid_at is None or boot[guid_at:guid_at + 16] == BITLOCKER_GUID):
            return list(struct.unpack_from(f"<{count}Q", boot, offsets_at))
    return []
