"""A small writer of Apple's UDIF disk images (``.dmg``), laid out as ``hdiutil create -format UDZO`` writes
them, because ``qemu-img`` can read DMG but not write it.

Layout (all integers big-endian): the data fork (every chunk, one after another), then an XML property list
whose ``resource-fork``/``blkx`` array holds one ``mish`` block table per region of the disk (base64, as
hdiutil does: one for the protective MBR, the GPT header, the entry table, each partition and each gap, the
backup table and header), then the 512-byte ``koly`` trailer that points at both. Each block table lists the
region's chunks: zlib-compressed (UDZO), raw (UDRW, where zlib does not make it smaller) or zero-filled
(UDZE, no data at all), ended by a terminator entry. Checksums are CRC32, as hdiutil's default: each table's
over the region's bytes, the data fork's over the fork, the trailer's master checksum over the tables'.
"""

from __future__ import annotations

import collections
import itertools
import plistlib
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mountd.image.blockio import BytesReader
from mountd.image.partitions import read_partition_table

SECTOR = 512
CHUNK_SECTORS = 2048  # 1 MiB of disk per chunk, as hdiutil writes UDZO
UDZE, UDRW, UDZO, UDLE = 0x00000000, 0x00000001, 0x80000005, 0xFFFFFFFF
CHECKSUM_CRC32 = 2
KOLY = struct.Struct(">4sIIIQQQQQII16sII128sQQ120sII128sIQ12s")
MISH = struct.Struct(">4sIQQQII24sII128sI")
CHUNK = struct.Struct(">IIQQQQ")
assert KOLY.size == 512 and MISH.size == 204 and CHUNK.size == 40


@dataclass(frozen=True)
class Region:
    name: str
    start: int  # bytes, a multiple of 512
    size: int


def _checksum(crc: int) -> bytes:
    return struct.pack(">I", crc).ljust(128, b"\0")


def regions(disk: bytes) -> list[Region]:
    """Where hdiutil starts a new block table: the table's own sectors and every partition and gap."""
    table = read_partition_table(BytesReader(disk))
    cuts = {0, len(disk)}
    names = {0: "whole disk (Apple_HFS : 0)"}
    if table is not None:
        ss = table.sector_size
        names = {0: "Protective Master Boot Record (MBR : 0)"}
        if table.label == "gpt":
            names |= {ss: "GPT Header (Primary GPT Header : 1)",
                      2 * ss: "GPT Partition Data (Primary GPT Table : 2)",
                      len(disk) - ss: "GPT Header (Backup GPT Header)"}
        for p in table.partitions:
            names[p.start] = f"Linux Filesystem (partition {p.number})"
            cuts.add(p.start + p.size)
        cuts |= set(names)
    bounds = sorted(x for x in cuts if 0 <= x <= len(disk))
    return [Region(names.get(a, "Apple_Free (free space)"), a, b - a) for a, b in itertools.pairwise(bounds)
            if b > a]


def _chunks(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, first sector relative to the region, sector count, stored bytes) for each chunk."""
    step = CHUNK_SECTORS * SECTOR
    for at in range(0, len(data), step):
        piece = data[at:at + step]
        sectors = -(-len(piece) // SECTOR)
        if not piece.strip(b"\0"):
            yield UDZE, at // SECTOR, sectors, b""
            continue
        packed = zlib.compress(piece.ljust(sectors * SECTOR, b"\0"), 9)
        if len(packed) < len(piece):
            yield UDZO, at // SECTOR, sectors, packed
        else:
            yield UDRW, at // SECTOR, sectors, piece


def _block_table(region: Region, data: bytes, fork: bytearray, number: int) -> tuple[bytes, int, list[int]]:
    """One region's ``mish`` table, its chunks appended to ``fork``; also its CRC and the chunk types."""
    entries, types = [], []
    for kind, sector, count, stored in _chunks(data):
        entries.append(CHUNK.pack(kind, 0, sector, count, len(fork), len(stored)))
        types.append(kind)
        fork += stored
    sectors = len(data) // SECTOR
    entries.append(CHUNK.pack(UDLE, 0, sectors, 0, len(fork), 0))
    crc = zlib.crc32(data)
    head = MISH.pack(b"mish", 1, region.start // SECTOR, sectors, 0, CHUNK_SECTORS + 8, number, b"",
                     CHECKSUM_CRC32, 32, _checksum(crc), len(entries))
    return head + b"".join(entries), crc, types


@dataclass(frozen=True)
class Written:
    path: Path
    tables: int
    chunk_types: collections.Counter[int]  # how many chunks of each type (UDZO, UDRW, UDZE)


def write_udif(raw: Path, dmg: Path) -> Written:
    """Write the disk in ``raw`` (its size a multiple of 512) as a UDZO ``dmg``."""
    disk = raw.read_bytes()
    if len(disk) % SECTOR:
        raise ValueError(f"{raw} is not a whole number of 512-byte sectors")
    fork = bytearray()
    blkx, crcs, counts = [], [], collections.Counter[int]()
    for number, region in enumerate(regions(disk)):
        table, crc, types = _block_table(region, disk[region.start:region.start + region.size], fork, number)
        blkx.append({"Attributes": "0x0050", "CFName": region.name, "Data": table, "ID": str(number - 1),
                     "Name": region.name})
        crcs.append(crc)
        counts.update(types)
    xml = plistlib.dumps({"resource-fork": {"blkx": blkx}})
    master = zlib.crc32(b"".join(struct.pack(">I", c) for c in crcs))
    trailer = KOLY.pack(b"koly", 4, 512, 1, 0, 0, len(fork), 0, 0, 1, 1, uuid.uuid4().bytes,
                        CHECKSUM_CRC32, 32, _checksum(zlib.crc32(fork)), len(fork), len(xml), b"",
                        CHECKSUM_CRC32, 32, _checksum(master), 1, len(disk) // SECTOR, b"")
    dmg.write_bytes(bytes(fork) + xml + trailer)
    return Written(dmg, len(blkx), counts)
