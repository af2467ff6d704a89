"""Read LVM2 physical volume labels and the metadata texts in their metadata areas without the LVM tools.

On-disk layout (lvm2 ``lib/label/label.c``, ``lib/format_text/layout.h``, ``format-text.c``): one of the first
four 512-byte sectors holds the label header ("LABELONE", its own sector number, a CRC of bytes 20..511, the
offset of the PV header, type "LVM2 001"). The PV header follows: a 32-character UUID, the device size, then
two zero-terminated lists of (offset, size): data areas, then metadata areas (mdas). Each mda starts with a
512-byte header (CRC, magic, version, start, size, raw locations); raw location 0 points at the committed
metadata text inside the mda, a circular buffer that may wrap back to just after the header. The text is
LVM's config syntax (turned into a volume group by :mod:`mountd.image.lvmmeta`) and carries the VG's
``seqno``; the copy with the highest seqno among this PV's valid mdas wins.

Error policy: a damaged metadata area is skipped (with a warning) when another area of the PV holds a valid
copy; when none does, the first problem is raised as :class:`LvmMetadataError`. A sector with "LABELONE" and
type "LVM2 001" but a bad checksum or sector number is an error, not "no label"; without that type (``wipefs``
zeroes it) the device is not a PV, as for LVM. Every read is bounded by the device size and every loop by the
sector, mda or text size; the text read, per copy and per image, by the bounds below.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import struct
import zlib
from dataclasses import dataclass

from mountd.image.blockio import BlockReader
from mountd.image.lvmconfig import LvmMetadataError
from mountd.image.lvmmeta import SECTOR, VolumeGroup, parse_vg

log = logging.getLogger(__name__)

LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_SCAN_SECTORS = 4
INITIAL_CRC = 0xF597A6CF
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_VERSION = 1
MDA_HEADER_SIZE = 512
RAW_LOCN_IGNORED = 0x1

# Bounds on the metadata read (those on what a text may hold are in mountd.image.lvmconfig).
#: The text of one metadata copy. lvm reads a VG's metadata through its block cache, whose size is
#: lvm.conf's io_memory_size (default 8 MiB: DEFAULT_IO_MEMORY_SIZE_KB in lvm2's lib/config/defaults.h); it
#: warns that a VG whose text comes within 1 MiB of that "may not be usable" (lib/label/label.c). With lvm's
#: default metadata area (1020 KiB, which must hold the old and the new copy) no text grows past ~500 KiB.
MAX_TEXT_SIZE = 8 << 20
#: Distinct metadata text read in one image (all its PVs): one VG at the largest size above. A real image's
#: VGs carry a few hundred KiB, the same text on each of a VG's PVs (parsed once).
MAX_IMAGE_TEXT = MAX_TEXT_SIZE

_LABEL = struct.Struct("<8sQII8s")  # id, sector, crc, offset of the PV header, type
_LOCN = struct.Struct("<QQ")  # disk_locn: offset, size (bytes)
_MDA_HEADER = struct.Struct("<I16sIQQ")  # crc, magic, version, start, size
_RAW_LOCN = struct.Struct("<QQII")  # offset (from mda start), size, text checksum, flags
_PV_UUID = re.compile(rb"[A-Za-z0-9!#]{32}")


@dataclass(frozen=True)
class PhysicalVolume:
    uuid: str  # from the PV label header
    device_size: int
    #: the newest valid metadata copy; None for an orphan PV, and for a PV of a VG whose metadata areas are
    #: absent (pvcreate --metadatacopies 0) or ignored (pvchange --metadataignore y): read its other PVs
    vg: VolumeGroup | None


def lvm_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """LVM's ``calc_crc``: CRC-32 (poly 0xedb88320) without zlib's pre- and post-inversion."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def format_uuid(raw: str) -> str:
    """LVM's 6-4-4-4-4-4-6 dashed form of a 32-character UUID."""
    cuts = (0, 6, 10, 14, 18, 22, 26, 32)
    return "-".join(raw[a:b] for a, b in itertools.pairwise(cuts))


# --- reading a PV -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _PvHeader:
    uuid: str
    device_size: int
    mdas: tuple[tuple[int, int], ...]  # (offset, size) in bytes; the data area list is not needed


class MetadataTexts:
    """The metadata texts of one image, parsed: each distinct text once (a VG's PVs all carry the same), and
    at most :data:`MAX_IMAGE_TEXT` bytes of distinct text in all, so an image cannot make us parse its
    largest text again on each of its many partitions."""

    def __init__(self) -> None:
        self.parsed: dict[bytes, VolumeGroup] = {}
        self.left = MAX_IMAGE_TEXT

    def vg(self, text: bytes) -> VolumeGroup:
        key = hashlib.sha256(text).digest()
        if key not in self.parsed:
            if len(text) > self.left:
                raise LvmMetadataError(f"the LVM metadata copies in this image hold more than "
                                       f"{MAX_IMAGE_TEXT} bytes of distinct text, more than imgmount reads")
            self.left -= len(text)
            self.parsed[key] = parse_vg(text)
        return self.parsed[key]


def read_pv(reader: BlockReader, texts: MetadataTexts | None = None) -> PhysicalVolume | None:
    """None when the device has no LVM2 label ("LABELONE" in sectors 0-3, type "LVM2 001"). ``texts``:
    those of the image's other PVs, read before."""
    label = _find_label(reader)
    if label is None:
        return None
    header = _pv_header(label)
    vg = _newest_vg(reader, header.mdas, texts or MetadataTexts())
    if vg is not None:
        _check_membership(vg, header.uuid, reader.size)
    return PhysicalVolume(header.uuid, header.device_size, vg)


def _find_label(reader: BlockReader) -> bytes | None:
    data = reader.read(0, LABEL_SCAN_SECTORS * SECTOR)
    problem = ""
    for sector in range(LABEL_SCAN_SECTORS):
        raw = data[sector * SECTOR : (sector + 1) * SECTOR]
        if len(raw) < SECTOR or raw[:8] != LABEL_ID:
            continue
        _, where, crc, _, kind = _LABEL.unpack_from(raw)
        if kind != LABEL_TYPE:  # another labeller, or wiped: wipefs zeroes "LVM2 001" only
            continue
        if where != sector:
            problem = problem or f"the LVM label in sector {sector} claims to belong in sector {where}"
        elif lvm_crc(raw[20:]) != crc:
            problem = problem or f"the LVM label in sector {sector} fails its checksum"
        else:
            return raw
    if problem:
        raise LvmMetadataError(problem)
    return None


def _pv_header(label: bytes) -> _PvHeader:
    offset = _LABEL.unpack_from(label)[3]
    if not _LABEL.size <= offset <= SECTOR - 40 - 2 * _LOCN.size:
        raise LvmMetadataError(f"the LVM label puts its PV header at impossible offset {offset}")
    raw_uuid = label[offset : offset + 32]
    if not _PV_UUID.fullmatch(raw_uuid):
        raise LvmMetadataError("the PV UUID in the LVM label contains invalid characters")
    device_size = struct.unpack_from("<Q", label, offset + 32)[0]
    pos = offset + 40
    lists: list[tuple[tuple[int, int], ...]] = []
    for _ in range(2):  # data areas, then metadata areas, each ended by a zero offset
        entries = []
        while True:
            if pos + _LOCN.size > SECTOR:
                raise LvmMetadataError("the PV header's area lists run past the end of the label sector")
            area_offset, area_size = _LOCN.unpack_from(label, pos)
            pos += _LOCN.size
            if area_offset == 0:
                break
            entries.append((area_offset, area_size))
        lists.append(tuple(entries))
    return _PvHeader(format_uuid(raw_uuid.decode("ascii")), device_size, lists[1])


def _newest_vg(reader: BlockReader, mdas: tuple[tuple[int, int], ...],
               texts: MetadataTexts) -> VolumeGroup | None:
    best: VolumeGroup | None = None
    errors: list[LvmMetadataError] = []
    for start, _size in mdas:
        try:
            vg = _read_mda(reader, start, texts)
        except LvmMetadataError as exc:
            errors.append(exc)
            continue
        if vg is not None and (best is None or vg.seqno > best.seqno):
            best = vg
    if best is None and errors:
        # Popped: were this frame (in the error's traceback) to hold the error, the two would form a cycle
        # that keeps the metadata text alive until the garbage collector runs.
        raise errors.pop(0)
    for error in errors:
        log.warning("using another LVM metadata copy: %s", error)
    return best


def _read_mda(reader: BlockReader, start: int, texts: MetadataTexts) -> VolumeGroup | None:
    """The VG in the metadata area at ``start``, None when it holds none (orphan PV or ignored area)."""
    where = f"the LVM metadata area at byte {start}"
    header = reader.read(start, MDA_HEADER_SIZE) if start < reader.size else b""
    if len(header) < MDA_HEADER_SIZE:
        raise LvmMetadataError(f"{where} lies past the end of the device")
    crc, magic, version, hstart, hsize = _MDA_HEADER.unpack_from(header)
    if lvm_crc(header[4:]) != crc:
        raise LvmMetadataError(f"{where} has a header that fails its checksum")
    if magic != MDA_MAGIC or version != MDA_VERSION or hstart != start:
        raise LvmMetadataError(f"{where} has a header with a wrong magic, version or start")
    if hsize <= MDA_HEADER_SIZE or start + hsize > reader.size:
        raise LvmMetadataError(f"{where} claims {hsize} bytes, past the end of the device")
    offset, length, checksum, flags = _RAW_LOCN.unpack_from(header, _MDA_HEADER.size)
    if offset == 0 or flags & RAW_LOCN_IGNORED:
        return None
    text = _read_text(reader, start, hsize, offset, length)
    if lvm_crc(text) != checksum:
        raise LvmMetadataError(f"{where} holds metadata text that fails its checksum")
    return texts.vg(text)


def _read_text(reader: BlockReader, start: int, hsize: int, offset: int, length: int) -> bytes:
    """The text at ``offset`` in the circular buffer ``[start + 512, start + hsize)``, unwrapped."""
    where = f"the LVM metadata area at byte {start}"
    if not MDA_HEADER_SIZE <= offset < hsize or not 0 < length <= hsize - MDA_HEADER_SIZE:
        raise LvmMetadataError(f"{where} locates its text outside the area ({length} bytes at {offset})")
    if length > MAX_TEXT_SIZE:
        raise LvmMetadataError(f"{where} holds {length} bytes of metadata text, more than the "
                               f"{MAX_TEXT_SIZE} imgmount reads")
    first = min(length, hsize - offset)
    wrap = length - first  # <= offset - 512 by the bounds above: the two parts never overlap
    text = reader.read(start + offset, first) + (reader.read(start + MDA_HEADER_SIZE, wrap) if wrap else b"")
    if len(text) != length:
        raise LvmMetadataError(f"{where} is cut short by the end of the device")
    return text


def _check_membership(vg: VolumeGroup, uuid: str, device_size: int) -> None:
    me = next((pv for pv in vg.pvs if pv.uuid == uuid), None)
    if me is None:
        raise LvmMetadataError(f"the metadata of volume group {vg.name} does not list this PV ({uuid})")
    end = me.pe_start + me.pe_count * vg.extent_size
    if me.pe_count and end > device_size:
        raise LvmMetadataError(f"volume group {vg.name} puts extents up to byte {end} of this PV, "
                               f"past its end at byte {device_size}")
