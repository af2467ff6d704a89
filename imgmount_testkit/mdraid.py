"""md RAID members for hosts without md, where ``mdadm --create`` cannot run (it needs the md driver).

A fake of one thing only: the superblock bytes ``mdadm --create`` writes (``super1.c``/``super0.c``: the same
fields, offsets, data offset and checksum), checked by ``mdadm --examine`` itself in the tests. Everything
else is real: sfdisk for the GPT, mkfs for the filesystem in the data area. The VM lane builds its arrays with
``mdadm --create`` (:func:`create_with_mdadm`).
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imgmount_testkit import images
from mountd.image.mdraid import MAGIC, sb0_checksum, sb1_checksum

SECTOR = 512
LINUX_RAID = "A19D880F-05FC-4D3B-A006-743F0F84911E"
#: mdadm 4.2's data offset for 1.1/1.2 on small devices: 1 MiB (room for a bitmap and the bad-block log).
DATA_OFFSET = 1 << 20


@dataclass(frozen=True)
class Array:
    name: str  # as mdadm stores it: "homehost:name"
    uuid: bytes = b"\x5a" * 16
    level: int = 1
    raid_disks: int = 2

    @property
    def short_name(self) -> str:
        return self.name.split(":", 1)[-1]


def data_area(version: str, size: int) -> tuple[int, int]:
    """Where a member of ``size`` bytes keeps its data: (offset, size), as mdadm lays it out."""
    if version == "1.0":
        return 0, (_sb1_sector(version, size) * SECTOR - 8 * 1024) & ~(64 * 1024 - 1)  # a bitmap's room
    if version == "0.90":
        return 0, _sb0_offset(size)
    return DATA_OFFSET, (size - DATA_OFFSET) & ~(64 * 1024 - 1)


def superblock(version: str, size: int, array: Array, role: int, *, events: int = 1) -> tuple[int, bytearray]:
    """The superblock of member ``role`` of ``array`` on a device of ``size`` bytes, and where it goes."""
    if version == "0.90":
        return _sb0_offset(size), _sb0(array, role, data_area(version, size)[1], events)
    sector = _sb1_sector(version, size)
    return sector * SECTOR, _sb1(array, role, version, size, sector, events)


def write_member(image: Path, offset: int, size: int, version: str, array: Array, role: int, *,
                 events: int = 1) -> None:
    """Write the superblock of member ``role`` of ``array`` into ``[offset, offset+size)`` of ``image``."""
    where, block = superblock(version, size, array, role, events=events)
    with open(image, "r+b") as f:
        f.seek(offset + where)
        f.write(block)


def _sb1_sector(version: str, size: int) -> int:
    return {"1.1": 0, "1.2": 8}.get(version, (size // SECTOR - 16) & ~7)


def _sb0_offset(size: int) -> int:
    return (size & ~(64 * 1024 - 1)) - 64 * 1024


def _sb1(array: Array, role: int, version: str, size: int, sector: int, events: int) -> bytearray:
    data_offset, data_size = data_area(version, size)
    max_dev = 128  # mdadm's default number of role slots
    head = struct.pack("<IIII16s32sQiiQII", MAGIC, 1, 0, 0, array.uuid, array.name.encode(), 1700000000,
                       array.level, 0, data_size // SECTOR, 0 if array.level == 1 else 128, array.raid_disks)
    block = bytearray(4096)
    block[:len(head)] = head
    struct.pack_into("<QQQQII16s", block, 128, data_offset // SECTOR, data_size // SECTOR, sector, 0, role, 0,
                     uuidlib.uuid4().bytes)
    struct.pack_into("<QQQII", block, 192, 1700000000, events, 2**64 - 1, 0, max_dev)
    roles = [i if i < array.raid_disks else 0xFFFF for i in range(max_dev)]
    struct.pack_into(f"<{max_dev}H", block, 256, *roles)
    return sign_sb1(block)


def sign_sb1(block: bytearray) -> bytearray:
    """Set a version-1 superblock's checksum (after a test changed a field)."""
    max_dev = struct.unpack_from("<I", block, 220)[0]
    struct.pack_into("<I", block, 216, sb1_checksum(bytes(block[:256 + 2 * min(max_dev, 1920)])))
    return block


def _sb0(array: Array, role: int, data_size: int, events: int) -> bytearray:
    words = [0] * 1024
    u = struct.unpack("<4I", array.uuid)
    words[0:16] = [MAGIC, 0, 90, 0, 0, u[0], 1700000000, array.level, data_size // 1024, array.raid_disks,
                   array.raid_disks, 0, 0, u[1], u[2], u[3]]
    words[32 + 7], words[32 + 8] = events & 0xFFFFFFFF, events >> 32
    for slot in range(array.raid_disks):
        words[128 + 32 * slot: 128 + 32 * slot + 5] = [slot, 0, 0, slot, 6]  # active, in sync
    words[992:997] = [role, 0, 0, role, 6]
    return sign_sb0(bytearray(struct.pack("<1024I", *words)))


def sign_sb0(block: bytearray) -> bytearray:
    """Set a version-0.90 superblock's checksum."""
    struct.pack_into("<I", block, 38 * 4, sb0_checksum(bytes(block)))
    return block


def format_data_area(image: Path, offset: int, size: int, version: str, fstype: str,
                     files: Mapping[str, bytes]) -> None:
    """A filesystem with ``files`` in the data area of the member at ``[offset, offset+size)``."""
    start, length = data_area(version, size)
    images.format_region(image, offset + start, length, fstype, label="raid", files=files)


def examine(image: Path, offset: int, size: int) -> dict[str, str]:
    """``mdadm --examine`` of the member at ``[offset, offset+size)``: its "Key : value" lines."""
    with images.loop(image, offset, size, read_only=True) as dev:
        out = images.run(["mdadm", "--examine", dev])
    return {k.strip(): v.strip() for k, _, v in (line.partition(" : ") for line in out.splitlines()) if v}
