"""Whether a filesystem needs log recovery, read from crafted superblocks (mountd.image.recovery): the ext flags,
btrfs's log root, and bytes that are no superblock at all. The host tests compare it with real filesystems."""

from __future__ import annotations

import os
import struct

import pytest

from mountd.image import recovery
from mountd.image.blockio import BytesReader, SliceReader

MiB = 1 << 20


def _ext_superblock(compat: int, incompat: int, journal_inum: int) -> bytes:
    sb = bytearray(1024)
    struct.pack_into("<H", sb, 0x38, 0xEF53)
    struct.pack_into("<II", sb, 0x5C, compat, incompat)
    struct.pack_into("<I", sb, 0xE0, journal_inum)
    return bytes(1024) + bytes(sb)


@pytest.mark.parametrize(("compat", "incompat", "inum", "state"), [
    (0x4, 0x4 | 0x40, 8, recovery.PENDING),  # has_journal, needs_recovery (and extents)
    (0x4, 0x40, 8, recovery.CLEAN),
    (0x4, 0x4, 0, recovery.ELSEWHERE),  # its journal is another device
    (0x0, 0x4, 0, recovery.CLEAN),  # no journal, whatever the flag says
])
def test_ext_superblock_flags(compat: int, incompat: int, inum: int, state: str) -> None:
    assert recovery.pending("ext4", BytesReader(_ext_superblock(compat, incompat, inum))) == state


def test_btrfs_log_root_and_what_is_not_a_superblock() -> None:
    sb = bytearray(0x10000 + 0x1000)
    sb[0x10040:0x10048] = b"_BHRfS_M"
    assert recovery.pending("btrfs", BytesReader(bytes(sb))) == recovery.CLEAN
    struct.pack_into("<Q", sb, 0x10060, 30408704)
    assert recovery.pending("btrfs", BytesReader(bytes(sb))) == recovery.PENDING
    junk = BytesReader(os.urandom(4 * MiB))
    assert [recovery.pending(t, junk) for t in ("ext4", "xfs", "btrfs", "vfat")] == [""] * 4
    assert recovery.pending("xfs", SliceReader(junk, 0, 0)) == ""
