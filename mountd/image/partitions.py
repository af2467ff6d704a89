"""Partition tables (MBR and GPT) read from untrusted bytes: the source of truth for volume offsets.

Choices where the tools disagree (each is tested):
- Which table: GPT needs a protective or hybrid MBR (an 0xEE entry), as in Linux and util-linux; GPT wins.
  A GPT header at LBA 1 with no MBR (or an MBR without entries) is still used, with a warning; a valid MBR
  table without 0xEE beside a GPT header is an MBR disk with a stale GPT (MBR used, warning).
- No table (None): no 0x55AA, an empty MBR, boot flags other than 0x00/0x80, or a FAT/NTFS/exFAT boot sector
  (a whole-disk filesystem), like libblkid.
- MBR numbering and logical chains follow the kernel (block/partitions/msdos.c): zero-size entries are
  skipped, every data entry of an EBR is a logical partition (the 3rd and 4th only if inside their
  extended partition), the first extended entry links to the next EBR, relative to the extended partition.
- A chain that loops back, leaves the disk, lacks 0x55AA or passes 256 EBRs is cut there, with a warning:
  the logical partitions read before are real, and the kernel too keeps them.
- Past the end of the disk, as the kernel does: a partition that starts there is left out, one that runs
  over is truncated, each with a warning (numbers are kept; a truncated image still mounts what it holds).
- GPT: a header is valid with its signature, header size, header CRC, my_lba, first <= last usable LBA,
  an entry size of 128 x 2^n, 1 to 1 MiB of entries inside the disk and the entry-array CRC. A bad primary
  falls back to the backup at the last LBA with a warning; both bad is an error naming both causes. An entry
  ending before it starts or lying outside the usable LBAs is left out with a warning.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from mountd.errors import InvalidArgumentError, InvalidImageError
from mountd.image.blockio import BlockReader

__all__ = ["Partition", "PartitionTable", "PartitionTableError", "read_partition_table"]

SECTOR_SIZES = (512, 4096)
MBR_SIZE = 512
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
GPT_PROTECTIVE_TYPE = 0xEE
MAX_EBRS = 256
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the 92 bytes UEFI defines
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")  # the first 128 bytes of an entry
MAX_ENTRY_ARRAY = 1 << 20
LEGACY_BIOS_BOOTABLE = 1 << 2


class PartitionTableError(InvalidImageError):
    """The partition table is corrupt in a way that leaves no trustworthy reading of it."""


@dataclass(frozen=True)
class Partition:
    number: int  # Linux numbering: MBR slots 1-4, logicals 5.. in chain order; GPT entry index + 1
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # GPT type GUID upper-case; MBR hex id lower-case without 0x ("83", "5")
    uuid: str  # GPT unique partition GUID upper-case; MBR ""
    name: str  # GPT partition name; MBR ""
    bootable: bool  # MBR active flag; GPT attribute bit 2 (legacy BIOS bootable)
    container: bool  # an MBR extended partition: holds the logicals, not a volume


@dataclass(frozen=True)
class PartitionTable:
    label: str  # "gpt" or "dos"
    sector_size: int
    disk_id: str  # GPT disk GUID upper-case; MBR "0x%08x"
    partitions: tuple[Partition, ...]  # sorted by number
    warnings: tuple[str, ...]  # problems recovered from


def read_partition_table(reader: BlockReader, sector_size: int | None = None) -> PartitionTable | None:
    """Read the table of a disk; None when there is none (empty disk, or a whole-disk filesystem).

    ``sector_size`` None finds GPT at LBA 1 for 512- or 4096-byte sectors; an MBR is read with 512 then.
    Raises :class:`PartitionTableError` for a corrupt table, and nothing else for any content.
    """
    if sector_size is not None and sector_size not in SECTOR_SIZES:
        raise InvalidArgumentError(f"sector size {sector_size} is not supported: use 512 or 4096")
    mbr = _read_exact(reader, 0, MBR_SIZE)
    if mbr is None:
        return None
    entries = _mbr_entries(mbr) if mbr[510:512] == b"\x55\xaa" else []
    # A filesystem boot sector's code can hold 0xEE anywhere: it is never a protective MBR.
    protective = any(e.type == GPT_PROTECTIVE_TYPE for e in entries) and not _is_boot_sector(mbr)
    dos = _looks_like_dos(mbr, entries) and not protective
    sizes = (sector_size,) if sector_size else SECTOR_SIZES
    for size in sizes:
        if reader.read(size, len(GPT_SIGNATURE)) != GPT_SIGNATURE:
            continue
        if dos:
            return _read_dos(reader, mbr, sector_size or 512, [
                f"ignoring the GPT header at LBA 1 ({size}-byte sectors): the MBR has no protective "
                "partition (type ee), so the GPT is stale"])
        warnings = [] if protective else ["the disk has a GPT but no protective MBR; using the GPT"]
        return _read_gpt(reader, size, warnings)
    if protective:
        return _read_gpt_without_primary(reader, sizes)
    return _read_dos(reader, mbr, sector_size or 512, []) if dos else None


# ---------------------------------------------------------------------------------------------- MBR


@dataclass(frozen=True)
class _MbrEntry:
    slot: int  # 0-3
    boot: int
    type: int
    start: int  # sectors
    count: int  # sectors


def _mbr_entries(sector: bytes) -> list[_MbrEntry]:
    """The non-empty (nonzero size) entries of an MBR or EBR sector, as the kernel counts them."""
    found = []
    for slot in range(4):
        raw = sector[446 + 16 * slot : 462 + 16 * slot]
        start, count = struct.unpack_from("<II", raw, 8)
        if count:
            found.append(_MbrEntry(slot, raw[0], raw[4], start, count))
    return found


def _looks_like_dos(mbr: bytes, entries: list[_MbrEntry]) -> bool:
    """An MBR table, not a filesystem boot sector that happens to end in 0x55AA (libblkid's rules)."""
    if not entries or _is_boot_sector(mbr):
        return False
    return all(mbr[446 + 16 * slot] in (0x00, 0x80) for slot in range(4))


def _is_boot_sector(sector: bytes) -> bool:
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return True
    bytes_per_sector, per_cluster, reserved, fats = struct.unpack_from("<HBHB", sector, 11)
    fat_name = sector[0x36:0x39] == b"FAT" or sector[0x52:0x57] == b"FAT32"
    return (sector[0] in (0xEB, 0xE9) and fat_name and bytes_per_sector in (512, 1024, 2048, 4096)
            and per_cluster > 0 and per_cluster & (per_cluster - 1) == 0 and reserved > 0 and fats in (1, 2))


def _read_dos(reader: BlockReader, mbr: bytes, sector_size: int, warnings: list[str]) -> PartitionTable:
    parts: list[Partition] = []
    next_logical = 5
    for entry in _mbr_entries(mbr):
        extended = entry.type in EXTENDED_TYPES
        part = _dos_partition(reader, entry.slot + 1, entry, start=entry.start, sector_size=sector_size,
                              warnings=warnings, container=extended)
        if part is not None:
            parts.append(part)
        if extended:
            logicals = _read_chain(reader, entry, sector_size, next_logical, warnings)
            parts += [p for p in logicals if p is not None]
            next_logical += len(logicals)
    disk_id = f"0x{struct.unpack_from('<I', mbr, 440)[0]:08x}"
    return PartitionTable("dos", sector_size, disk_id, tuple(sorted(parts, key=lambda p: p.number)),
                          tuple(warnings))


def _dos_partition(reader: BlockReader, number: int, entry: _MbrEntry, *, start: int, sector_size: int,
                   warnings: list[str], container: bool = False) -> Partition | None:
    place = _fit(number, start * sector_size, entry.count * sector_size, reader.size, warnings)
    if place is None:
        return None
    return Partition(number, place[0], place[1], f"{entry.type:x}", "", "", entry.boot == 0x80, container)


def _read_chain(reader: BlockReader, extended: _MbrEntry, sector_size: int, first_number: int,
                warnings: list[str]) -> list[Partition | None]:
    """The logical partitions of the EBR chain in ``extended`` (None for one left out past the disk end)."""
    found: list[Partition | None] = []
    visited: set[int] = set()
    ebr, ebr_count = extended.start, extended.count
    while True:
        problem = _chain_problem(reader, ebr, sector_size, visited)
        if problem:
            warnings.append(f"logical partitions: {problem}; the partitions after it are ignored")
            return found
        visited.add(ebr)
        sector = reader.read(ebr * sector_size, MBR_SIZE)
        if sector[510:512] != b"\x55\xaa":
            warnings.append(f"logical partitions: the EBR at sector {ebr} has no 0x55AA signature; "
                            "the partitions after it are ignored")
            return found
        entries = _mbr_entries(sector)
        for entry in entries:
            if entry.type in EXTENDED_TYPES or not _inside(entry, ebr, ebr_count, extended):
                continue
            found.append(_dos_partition(reader, first_number + len(found), entry, start=ebr + entry.start,
                                        sector_size=sector_size, warnings=warnings))
        link = next((e for e in entries if e.type in EXTENDED_TYPES), None)
        if link is None:
            return found
        ebr, ebr_count = extended.start + link.start, link.count


def _chain_problem(reader: BlockReader, ebr: int, sector_size: int, visited: set[int]) -> str:
    if ebr in visited:
        return f"the EBR chain loops back to sector {ebr}"
    if len(visited) >= MAX_EBRS:
        return f"the EBR chain is longer than {MAX_EBRS} links"
    if ebr == 0:
        return "an extended partition starts at sector 0, the MBR itself"
    if (ebr + 1) * sector_size > reader.size:
        return f"the EBR at sector {ebr} is past the end of the disk"
    return ""


def _inside(entry: _MbrEntry, ebr: int, ebr_count: int, extended: _MbrEntry) -> bool:
    """The kernel's test for real data in the 3rd and 4th EBR entries, which often hold garbage."""
    if entry.slot < 2:
        return True
    start = ebr + entry.start
    return (entry.start + entry.count <= ebr_count and start >= extended.start
            and start + entry.count <= extended.start + extended.count)


def _fit(number: int, start: int, size: int, disk_size: int, warnings: list[str]) -> tuple[int, int] | None:
    """Clip a partition to the disk as the kernel does: left out if it starts past the end, else truncated."""
    if start >= disk_size:
        warnings.append(f"partition {number} starts at byte {start}, past the end of the disk "
                        f"({disk_size} bytes); it is ignored")
        return None
    if start + size > disk_size:
        warnings.append(f"partition {number} runs past the end of the disk ({disk_size} bytes); "
                        f"truncated from {size} to {disk_size - start} bytes")
        return start, disk_size - start
    return start, size


# ---------------------------------------------------------------------------------------------- GPT


@dataclass(frozen=True)
class _GptHeader:
    lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entry_size: int
    entries: bytes


class _BadGpt(Exception):
    """Why one GPT copy (header or entry array) cannot be used."""


def _read_gpt(reader: BlockReader, sector_size: int, warnings: list[str]) -> PartitionTable:
    last_lba = reader.size // sector_size - 1
    try:
        header = _load_gpt(reader, sector_size, 1)
    except _BadGpt as primary:
        try:
            header = _load_gpt(reader, sector_size, last_lba)
        except _BadGpt as backup:
            raise PartitionTableError(f"the GPT is corrupt: primary {primary}; backup {backup}") from None
        warnings.append(f"primary GPT is corrupt ({primary}); using the backup header")
    else:
        warnings += _check_backup(reader, sector_size, header)
    return _gpt_table(header, sector_size, reader.size, warnings)


def _read_gpt_without_primary(reader: BlockReader, sizes: tuple[int, ...]) -> PartitionTable:
    """A protective MBR with no GPT signature at LBA 1: only a backup header can still describe the disk."""
    reasons = []
    for size in sizes:
        try:
            header = _load_gpt(reader, size, reader.size // size - 1)
        except _BadGpt as backup:
            reasons.append(f"backup {backup} ({size}-byte sectors)")
            continue
        warning = "primary GPT is missing (no GPT signature at LBA 1); using the backup header"
        return _gpt_table(header, size, reader.size, [warning])
    raise PartitionTableError("the MBR has a GPT protective partition (type ee) but no valid GPT: no GPT "
                              f"signature at LBA 1, and {'; '.join(reasons)}")


def _check_backup(reader: BlockReader, sector_size: int, primary: _GptHeader) -> list[str]:
    disk_lbas = reader.size // sector_size
    if primary.last_usable >= disk_lbas or primary.alternate_lba >= disk_lbas:
        return [f"the GPT describes a disk larger than the image ({disk_lbas} sectors of {sector_size} "
                "bytes): the image looks truncated"]
    try:
        _load_gpt(reader, sector_size, primary.alternate_lba)
    except _BadGpt as backup:
        return [f"backup GPT is corrupt ({backup}); using the primary header"]
    return []


def _load_gpt(reader: BlockReader, sector_size: int, lba: int) -> _GptHeader:
    raw = _read_exact(reader, lba * sector_size, sector_size) if lba > 0 else None
    if raw is None:
        raise _BadGpt(f"header at LBA {lba} is outside the disk")
    (signature, _revision, header_size, header_crc, _reserved, my_lba, alternate_lba, first_usable,
     last_usable, disk_guid, entries_lba, count, entry_size, entries_crc) = GPT_HEADER.unpack_from(raw)
    if signature != GPT_SIGNATURE:
        raise _BadGpt(f"header at LBA {lba} has no GPT signature")
    if not GPT_HEADER.size <= header_size <= sector_size:
        raise _BadGpt(f"header at LBA {lba} has an invalid header size {header_size}")
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:header_size]) != header_crc:
        raise _BadGpt(f"header at LBA {lba} has a header CRC mismatch")
    if my_lba != lba:
        raise _BadGpt(f"header at LBA {lba} says it is at LBA {my_lba}")
    if first_usable > last_usable:
        raise _BadGpt(f"header at LBA {lba} has first usable LBA {first_usable} after last {last_usable}")
    entries = _load_entries(reader, sector_size, lba, entries_lba=entries_lba, count=count,
                            entry_size=entry_size)
    if zlib.crc32(entries) != entries_crc:
        raise _BadGpt(f"header at LBA {lba} has a partition entry array CRC mismatch")
    return _GptHeader(lba, alternate_lba, first_usable, last_usable, _guid(disk_guid), entry_size, entries)


def _load_entries(reader: BlockReader, sector_size: int, lba: int, *, entries_lba: int, count: int,
                  entry_size: int) -> bytes:
    if entry_size < GPT_ENTRY.size or entry_size & (entry_size - 1):
        raise _BadGpt(f"header at LBA {lba} has an invalid entry size {entry_size} (not 128 x 2^n)")
    if not 0 < count * entry_size <= MAX_ENTRY_ARRAY:
        raise _BadGpt(f"header at LBA {lba} claims {count} partition entries of {entry_size} bytes "
                      f"(0 or more than {MAX_ENTRY_ARRAY} bytes)")
    entries = _read_exact(reader, entries_lba * sector_size, count * entry_size) if entries_lba else None
    if entries is None:
        raise _BadGpt(f"header at LBA {lba} puts its partition entries outside the disk (LBA {entries_lba})")
    return entries


def _gpt_table(header: _GptHeader, sector_size: int, disk_size: int, warnings: list[str]) -> PartitionTable:
    parts = []
    for index in range(len(header.entries) // header.entry_size):
        fields = GPT_ENTRY.unpack_from(header.entries, index * header.entry_size)
        part = _gpt_partition(index + 1, fields, header, sector_size=sector_size, disk_size=disk_size,
                              warnings=warnings)
        if part is not None:
            parts.append(part)
    return PartitionTable("gpt", sector_size, header.disk_guid, tuple(parts), tuple(warnings))


def _gpt_partition(number: int, fields: tuple[bytes, bytes, int, int, int, bytes], header: _GptHeader, *,
                   sector_size: int, disk_size: int, warnings: list[str]) -> Partition | None:
    type_guid, unique_guid, first, last, attributes, name = fields
    if not any(type_guid):
        return None
    if last < first or first < header.first_usable or last > header.last_usable:
        warnings.append(f"GPT partition {number} (sectors {first}-{last}) is not inside the usable sectors "
                        f"{header.first_usable}-{header.last_usable}; it is ignored")
        return None
    place = _fit(number, first * sector_size, (last - first + 1) * sector_size, disk_size, warnings)
    if place is None:
        return None
    return Partition(number, place[0], place[1], _guid(type_guid), _guid(unique_guid), _utf16_name(name),
                     bool(attributes & LEGACY_BIOS_BOOTABLE), False)


def _guid(raw: bytes) -> str:
    """A GUID as sfdisk prints it: the first three fields are little-endian on disk."""
    return str(uuid.UUID(bytes_le=raw)).upper()


def _utf16_name(raw: bytes) -> str:
    units = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    end = units.index(b"\0\0") if b"\0\0" in units else len(units)
    return b"".join(units[:end]).decode("utf-16-le", errors="replace")


def _read_exact(reader: BlockReader, offset: int, length: int) -> bytes | None:
    """``length`` bytes at ``offset``, or None where the disk ends first."""
    if offset + length > reader.size:
        return None
    data = reader.read(offset, length)
    return data if len(data) == length else None
