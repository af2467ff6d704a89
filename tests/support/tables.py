"""Build MBR and GPT partition tables as bytes in pure Python, for parser tests without root or tools.

The builders follow the on-disk formats directly (UEFI 2.x chapter 5, the DOS MBR/EBR layout) and are
independent of :mod:`mountd.image.partitions`: the tests compare one against the other, and the host tests
compare both against sfdisk.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_HEADER_FIELDS = {  # name: (offset, struct format)
    "signature": (0, "8s"), "revision": (8, "I"), "header_size": (12, "I"), "header_crc": (16, "I"),
    "my_lba": (24, "Q"), "alternate_lba": (32, "Q"), "first_usable": (40, "Q"), "last_usable": (48, "Q"),
    "disk_guid": (56, "16s"), "entries_lba": (72, "Q"), "num_entries": (80, "I"), "entry_size": (84, "I"),
    "entries_crc": (88, "I"),
}


@dataclass(frozen=True)
class MbrEntry:
    start: int  # sectors (absolute for primaries; the builders make EBR entries relative)
    count: int
    type: int = 0x83
    boot: bool = False


@dataclass(frozen=True)
class Logical:
    ebr: int  # absolute sector of the EBR that describes this logical partition
    start: int  # absolute start sector
    count: int
    type: int = 0x83
    boot: bool = False


def mbr_sector(entries: Sequence[MbrEntry | None], *, disk_id: int = 0x1234ABCD) -> bytes:
    """A 512-byte MBR (or EBR) with up to four entries (None leaves a slot empty) and 0x55AA."""
    sector = bytearray(512)
    struct.pack_into("<I", sector, 440, disk_id)
    for slot, entry in enumerate(entries):
        if entry is not None:
            struct.pack_into("<B3sB3sII", sector, 446 + 16 * slot, 0x80 if entry.boot else 0, b"\xff\xff\xfe",
                             entry.type, b"\xff\xff\xfe", entry.start, entry.count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def dos_image(primaries: Sequence[MbrEntry | None], logicals: Sequence[Logical] = (), *, disk_sectors: int,
              sector_size: int = 512, ext_type: int = 0x05) -> bytearray:
    """A disk with an MBR; ``logicals`` are chained (in the given order) in the first extended primary."""
    image = bytearray(disk_sectors * sector_size)
    image[:512] = mbr_sector(primaries)
    ext = next((e for e in primaries if e is not None and e.type == ext_type), None)
    for i, logical in enumerate(logicals):
        assert ext is not None, "logical partitions need an extended primary"
        data = MbrEntry(logical.start - logical.ebr, logical.count, logical.type, logical.boot)
        link = None
        if i + 1 < len(logicals):
            nxt = logicals[i + 1]
            link = MbrEntry(nxt.ebr - ext.start, nxt.start + nxt.count - nxt.ebr, ext_type)
        write_sector(image, logical.ebr, sector_size, mbr_sector([data, link], disk_id=0))
    return image


def write_sector(image: bytearray, lba: int, sector_size: int, data: bytes) -> None:
    image[lba * sector_size : lba * sector_size + len(data)] = data


@dataclass(frozen=True)
class GptEntry:
    index: int  # 0-based slot in the entry array (Linux number - 1)
    first: int
    last: int
    type: str = LINUX_FS
    guid: str = ""  # derived from the index when empty
    name: str = ""
    attributes: int = 0

    def unique_guid(self) -> str:
        return self.guid or str(uuid.UUID(int=0xA000 + self.index)).upper()


def gpt_image(entries: Sequence[GptEntry], *, disk_sectors: int, sector_size: int = 512,
              num_entries: int = 128, entry_size: int = 128, disk_guid: str = "5A3C5E0B-2D2E-4C6B-9F0E-0123456789AB",
              hybrid: Sequence[MbrEntry] = ()) -> bytearray:
    """A GPT disk: protective (or hybrid) MBR, primary header and entries, backup entries and header."""
    image = bytearray(disk_sectors * sector_size)
    protective = MbrEntry(1, min(disk_sectors - 1, 0xFFFFFFFF), 0xEE)
    image[:512] = mbr_sector([protective, *hybrid], disk_id=0)
    array = entry_array(entries, num_entries, entry_size)
    array_sectors = -(-len(array) // sector_size)
    last = disk_sectors - 1
    first_usable, last_usable = 2 + array_sectors, last - 1 - array_sectors
    for lba, alternate, entries_lba in ((1, last, 2), (last, 1, last - array_sectors)):
        write_sector(image, entries_lba, sector_size, array)
        header = gpt_header(my_lba=lba, alternate_lba=alternate, first_usable=first_usable,
                            last_usable=last_usable, disk_guid=disk_guid, entries_lba=entries_lba,
                            num_entries=num_entries, entry_size=entry_size, entries_crc=zlib.crc32(array))
        write_sector(image, lba, sector_size, header)
    return image


def entry_array(entries: Sequence[GptEntry], num_entries: int, entry_size: int) -> bytes:
    array = bytearray(num_entries * entry_size)
    for e in entries:
        name = e.name.encode("utf-16-le", errors="surrogatepass")[:72]
        struct.pack_into("<16s16sQQQ72s", array, e.index * entry_size, guid_bytes(e.type),
                         guid_bytes(e.unique_guid()), e.first, e.last, e.attributes, name)
    return bytes(array)


def gpt_header(*, my_lba: int, alternate_lba: int, first_usable: int, last_usable: int, disk_guid: str,
               entries_lba: int, num_entries: int, entry_size: int, entries_crc: int) -> bytes:
    header = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, my_lba,
                                   alternate_lba, first_usable, last_usable, guid_bytes(disk_guid),
                                   entries_lba, num_entries, entry_size, entries_crc))
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    return bytes(header)


def guid_bytes(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def header_field(image: bytes | bytearray, lba: int, sector_size: int, name: str) -> int | bytes:
    offset, fmt = GPT_HEADER_FIELDS[name]
    value: int | bytes = struct.unpack_from("<" + fmt, image, lba * sector_size + offset)[0]
    return value


def set_header_field(image: bytearray, lba: int, sector_size: int, name: str, value: int | bytes, *,
                     fix_crc: bool = True) -> None:
    """Change one GPT header field, and by default recompute the header CRC so only that field is wrong."""
    offset, fmt = GPT_HEADER_FIELDS[name]
    struct.pack_into("<" + fmt, image, lba * sector_size + offset, value)
    if fix_crc:
        fix_header_crc(image, lba, sector_size)


def fix_header_crc(image: bytearray, lba: int, sector_size: int) -> None:
    base = lba * sector_size
    size = min(struct.unpack_from("<I", image, base + 12)[0], sector_size)
    struct.pack_into("<I", image, base + 16, 0)
    struct.pack_into("<I", image, base + 16, zlib.crc32(bytes(image[base : base + size])))


def fix_entries_crc(image: bytearray, lba: int, sector_size: int) -> None:
    """Recompute the entry-array CRC of the header at ``lba`` (and then its header CRC)."""
    base = lba * sector_size
    entries_lba, count, size = struct.unpack_from("<QII", image, base + 72)
    start = entries_lba * sector_size
    struct.pack_into("<I", image, base + 88, zlib.crc32(bytes(image[start : start + count * size])))
    fix_header_crc(image, lba, sector_size)


class SparseReader:
    """A huge disk that is all zeros except a few chunks: bounds tests without allocating the disk."""

    def __init__(self, size: int, chunks: dict[int, bytes]) -> None:
        self._size = size
        self._chunks = chunks

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        out = bytearray(length)
        for start, data in self._chunks.items():
            lo, hi = max(start, offset), min(start + len(data), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - start : hi - start]
        return bytes(out)
