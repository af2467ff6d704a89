"""Whether Windows left an NTFS volume in a state that only Windows may write to, by pure parsing.

- **Dirty**: the ``VOLUME_IS_DIRTY`` flag of ``$VOLUME_INFORMATION`` in ``$Volume`` (MFT record 3), set by a
  Windows that crashed or asked for chkdsk at the next boot.
- **Hibernated**: ``hiberfil.sys`` in the root directory starting with "hibr"/"HIBR" (ntfs-3g's
  ``ntfs_volume_check_hiberfile`` reads the same four bytes, case-insensitively): a hibernated Windows, or one
  shut down with Fast Startup, whose cached view of the volume is restored at its next boot. Writing to it
  meanwhile loses data on both sides.

The MFT's first records lie in its first extent (where the boot sector points); any other record is found
through ``$MFT``'s own runlist. The root directory's B-tree (``$I30``: ``$INDEX_ROOT``, then the
``$INDEX_ALLOCATION`` blocks its entries point to) is walked whole, each block once. Every read is bounded by
the volume, every loop by :data:`MAX_INDEX_BLOCKS` or the record size; anything unexpected reads as "not
known", never as an error: the mount goes on, and the driver has the last word.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mountd.image.blockio import BlockReader

VOLUME_RECORD, ROOT_RECORD = 3, 5
AT_VOLUME_INFORMATION, AT_DATA, AT_INDEX_ROOT, AT_INDEX_ALLOCATION = 0x70, 0x80, 0x90, 0xA0
AT_END = 0xFFFFFFFF
VOLUME_IS_DIRTY = 0x0001
ENTRY_NODE, ENTRY_END = 0x1, 0x2
MAX_RECORD = 64 << 10
MAX_INDEX_BLOCK = 64 << 10
MAX_INDEX_BLOCKS = 4096  # a root directory of ~100k entries; Windows' own C:\\ has a few dozen
MAX_RUNS = 4096
HIBERFILE = "hiberfil.sys"


@dataclass(frozen=True)
class NtfsState:
    dirty: bool = False
    hibernated: bool = False


@dataclass(frozen=True)
class _Geometry:
    cluster: int
    record: int
    mft: int  # byte offset of the MFT's first extent


def state(reader: BlockReader) -> NtfsState:
    """The dirty flag and the hibernation signature of the NTFS volume on ``reader`` (clean if unreadable)."""
    geo = _geometry(reader.read(0, 512))
    if geo is None:
        return NtfsState()
    return NtfsState(_dirty(reader, geo), _hibernated(reader, geo))


def _geometry(boot: bytes) -> _Geometry | None:
    if len(boot) < 512 or boot[3:11] != b"NTFS    ":
        return None
    sector, per_cluster = struct.unpack_from("<HB", boot, 0x0B)
    if per_cluster > 0x80:  # large clusters are stored as a negative power of two
        per_cluster = 1 << (256 - per_cluster)
    mft_lcn = struct.unpack_from("<Q", boot, 0x30)[0]
    record = _size_field(boot[0x40], sector * per_cluster)
    if sector not in (512, 1024, 2048, 4096) or not 0 < per_cluster <= 1 << 16 \
            or not 512 <= record <= MAX_RECORD:
        return None
    return _Geometry(sector * per_cluster, record, mft_lcn * sector * per_cluster)


def _size_field(value: int, cluster: int) -> int:
    """Clusters per record, or (negative, as a signed byte) log2 of its size in bytes."""
    return 1 << (256 - value) if value > 0x80 else value * cluster


def _fixed(block: bytes, magic: bytes) -> bytes | None:
    """``block`` with its update sequence applied (the last two bytes of each 512-byte stride), or None."""
    if len(block) < 48 or block[:4] != magic:
        return None
    usa_ofs, usa_count = struct.unpack_from("<HH", block, 4)
    if usa_count < 1 or (usa_count - 1) * 512 > len(block) or usa_ofs + 2 * usa_count > len(block):
        return None
    data = bytearray(block)
    check = block[usa_ofs:usa_ofs + 2]
    for i in range(1, usa_count):
        end = i * 512
        if data[end - 2:end] != check:
            return None
        data[end - 2:end] = block[usa_ofs + 2 * i:usa_ofs + 2 * i + 2]
    return bytes(data)


def _attributes(record: bytes) -> list[tuple[int, bytes]]:
    """(type, whole attribute) of a FILE record's unnamed or ``$I30`` attributes, in order."""
    found = []
    pos = struct.unpack_from("<H", record, 0x14)[0]
    while pos + 16 <= len(record):
        kind, length = struct.unpack_from("<II", record, pos)
        if kind == AT_END or length < 16 or pos + length > len(record):
            break
        found.append((kind, record[pos:pos + length]))
        pos += length
    return found


def _resident(attr: bytes) -> bytes | None:
    if attr[8] != 0 or len(attr) < 24:
        return None
    size, offset = struct.unpack_from("<IH", attr, 0x10)
    return attr[offset:offset + size] if offset + size <= len(attr) else None


def _runs(attr: bytes) -> list[tuple[int | None, int]]:
    """A non-resident attribute's runs: (first cluster or None for a hole, length in clusters)."""
    if attr[8] != 1 or len(attr) < 0x40:
        return []
    pos, lcn = struct.unpack_from("<H", attr, 0x20)[0], 0
    runs: list[tuple[int | None, int]] = []
    while pos < len(attr) and attr[pos] and len(runs) < MAX_RUNS:
        len_size, off_size = attr[pos] & 0xF, attr[pos] >> 4
        start = pos + 1 + len_size
        if start + off_size > len(attr) or not 0 < len_size <= 8 or off_size > 8:
            return []
        length = int.from_bytes(attr[pos + 1:start], "little")
        if off_size:
            lcn += int.from_bytes(attr[start:start + off_size], "little", signed=True)
        runs.append((lcn if off_size else None, length))
        pos += 1 + len_size + off_size
    return runs


def _at_vcn(runs: list[tuple[int | None, int]], vcn: int) -> int | None:
    """The cluster that holds virtual cluster ``vcn``, or None (a hole, or past the end)."""
    for lcn, length in runs:
        if vcn < length:
            return None if lcn is None else lcn + vcn
        vcn -= length
    return None


def _record(reader: BlockReader, geo: _Geometry, number: int) -> bytes | None:
    """MFT record ``number``: from the MFT's first extent for the system records, else through its runlist."""
    offset = geo.mft + number * geo.record
    if number >= 16:
        mft = _record(reader, geo, 0)
        data = next((a for k, a in _attributes(mft) if k == AT_DATA and a[9] == 0), None) if mft else None
        cluster = _at_vcn(_runs(data), number * geo.record // geo.cluster) if data else None
        if cluster is None:
            return None
        offset = cluster * geo.cluster + number * geo.record % geo.cluster
    return _fixed(reader.read(offset, geo.record), b"FILE")


def _dirty(reader: BlockReader, geo: _Geometry) -> bool:
    record = _record(reader, geo, VOLUME_RECORD)
    for kind, attr in _attributes(record) if record else []:
        value = _resident(attr) if kind == AT_VOLUME_INFORMATION else None
        if value is not None and len(value) >= 12:
            return bool(struct.unpack_from("<H", value, 10)[0] & VOLUME_IS_DIRTY)
    return False


def _hibernated(reader: BlockReader, geo: _Geometry) -> bool:
    number = _find_in_root(reader, geo, HIBERFILE)
    record = _record(reader, geo, number) if number is not None else None
    data = next((a for k, a in _attributes(record) if k == AT_DATA and a[9] == 0), None) if record else None
    if data is None:
        return False
    head = _resident(data)
    if head is None:
        first = _at_vcn(_runs(data), 0)
        head = reader.read(first * geo.cluster, 4) if first is not None else b""
    return head[:4].lower() == b"hibr"


def _find_in_root(reader: BlockReader, geo: _Geometry, name: str) -> int | None:
    """The MFT record number of ``name`` in the root directory (case-insensitive, any namespace)."""
    root = _record(reader, geo, ROOT_RECORD)
    attrs = _attributes(root) if root else []
    index_root = next((_resident(a) for k, a in attrs if k == AT_INDEX_ROOT), None)
    if index_root is None or len(index_root) < 32:
        return None
    block_size = struct.unpack_from("<I", index_root, 8)[0]
    alloc = next((a for k, a in attrs if k == AT_INDEX_ALLOCATION), None)
    runs = _runs(alloc) if alloc else []
    pending, seen = [_entries(index_root, 16)], set[int]()
    while pending:
        for number, entry_name, child in pending.pop():
            if entry_name.lower() == name:
                return number
            if child is not None and child not in seen and len(seen) < MAX_INDEX_BLOCKS:
                seen.add(child)
                pending.append(_index_block(reader, geo, runs, child, block_size))
    return None


def _index_block(reader: BlockReader, geo: _Geometry, runs: list[tuple[int | None, int]], vcn: int,
                 block_size: int) -> list[tuple[int, str, int | None]]:
    """The entries of the ``$INDEX_ALLOCATION`` block at ``vcn`` (in clusters, or 512-byte units for blocks
    smaller than a cluster)."""
    if not 512 <= block_size <= MAX_INDEX_BLOCK:
        return []
    unit = geo.cluster if block_size >= geo.cluster else 512
    cluster = _at_vcn(runs, vcn * unit // geo.cluster)
    if cluster is None:
        return []
    block = _fixed(reader.read(cluster * geo.cluster + vcn * unit % geo.cluster, block_size), b"INDX")
    return _entries(block, 0x18) if block else []


def _entries(data: bytes, header: int) -> list[tuple[int, str, int | None]]:
    """(MFT record, file name, child block VCN or None) of each entry of the index node at ``header``."""
    if header + 16 > len(data):
        return []
    first, length = struct.unpack_from("<II", data, header)
    pos, end = header + first, header + length
    found: list[tuple[int, str, int | None]] = []
    while pos + 16 <= min(end, len(data)):
        ref, size, key_length, flags = struct.unpack_from("<QHHH", data, pos)
        if size < 16 or pos + size > len(data):
            break
        child = struct.unpack_from("<Q", data, pos + size - 8)[0] if flags & ENTRY_NODE else None
        name = _key_name(data[pos + 16:pos + 16 + key_length]) if not flags & ENTRY_END else ""
        found.append((ref & 0xFFFFFFFFFFFF, name, child))
        if flags & ENTRY_END:
            break
        pos += size
    return found


def _key_name(key: bytes) -> str:
    """The name in a ``$FILE_NAME`` index key."""
    if len(key) < 0x42:
        return ""
    return key[0x42:0x42 + 2 * key[0x40]].decode("utf-16-le", errors="replace")
