"""The probe's copy of a volume for blkid includes what a BitLocker boot sector points to (its FVE metadata,
which Windows 10 puts half-way into the volume, beyond the copied head and tail), and nothing a crafted
pointer names outside the volume."""

from __future__ import annotations

import os
import struct

import pytest

from mountd.image.blockio import BytesReader
from mountd.image.fsprobe import BITLOCKER_GUID, HEAD, _pointed_to, _sparse_copy

SIZE = 8 << 20


def boot_sector(offsets: tuple[int, int, int]) -> bytes:
    boot = bytearray(512)
    boot[0:11] = b"\xeb\x58\x90-FVE-FS-"
    boot[0xA0:0xB0] = BITLOCKER_GUID
    struct.pack_into("<3Q", boot, 0xB0, *offsets)
    return bytes(boot)


def copied(volume: bytes) -> bytes:
    fd = os.memfd_create("test")
    try:
        _sparse_copy(BytesReader(volume), fd)
        return os.pread(fd, len(volume) + 1, 0)
    finally:
        os.close(fd)


def test_the_metadata_blocks_beyond_the_head_are_copied() -> None:
    at = (SIZE // 2 + 100, SIZE // 2 + (1 << 20), SIZE // 2 + (2 << 20))
    volume = bytearray(SIZE)
    volume[:512] = boot_sector(at)
    for offset in at:
        volume[offset:offset + 8] = b"-FVE-FS-"
    copy = copied(bytes(volume))
    assert len(copy) == SIZE and all(copy[o:o + 8] == b"-FVE-FS-" for o in at)
    assert copy[HEAD:at[0] - 100 - 4096] == bytes(len(copy[HEAD:at[0] - 100 - 4096]))  # nothing else


@pytest.mark.parametrize("offsets", [(SIZE, SIZE + 4096, 2**64 - 1), (0, 1, 2), (SIZE - 1, 2**63, 4096)])
def test_crafted_pointers_outside_the_volume_or_in_its_head_copy_nothing_more(offsets: tuple[int, ...]) -> None:
    volume = boot_sector(offsets) + bytes(SIZE - 512)  # type: ignore[arg-type]
    assert copied(volume) == volume


def test_only_bitlocker_boot_sectors_are_followed() -> None:
    assert _pointed_to(boot_sector((1, 2, 3))) == [1, 2, 3]
    assert _pointed_to(b"\xeb\x52\x90-FVE-FS-" + bytes(45) + struct.pack("<Q", 7)) == [7]  # Vista
    assert _pointed_to(b"\xeb\x52\x90-FVE-FS-") == []  # too short to hold its pointer
    assert _pointed_to(b"\xeb\x58\x90NTFS    " + bytes(500)) == []
    not_ours = bytearray(boot_sector((1, 2, 3)))
    not_ours[0xA0] ^= 1
    assert _pointed_to(bytes(not_ours)) == []
