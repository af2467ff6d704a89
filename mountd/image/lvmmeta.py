"""Read LVM2 physical volume labels and volume group metadata without the LVM tools.

On-disk layout (lvm2 ``lib/label/label.c``, ``lib/format_text/layout.h``, ``format-text.c``): one of the first
four 512-byte sectors holds the label header ("LABELONE", its own sector number, a CRC of bytes 20..511, the
offset of the PV header, type "LVM2 001"). The PV header follows: a 32-character UUID, the device size, then
two zero-terminated lists of (offset, size): data areas, then metadata areas (mdas). Each mda starts with a
512-byte header (CRC, magic, version, start, size, raw locations); raw location 0 points at the committed
metadata text inside the mda, a circular buffer that may wrap back to just after the header. The text is
LVM's config syntax and carries the VG's ``seqno``; the copy with the highest seqno among this PV's valid
mdas wins.

Error policy: a damaged metadata area is skipped (with a warning) when another area of the PV holds a valid
copy; when none does, the first problem is raised as :class:`LvmMetadataError`. A sector with "LABELONE" and
type "LVM2 001" but a bad checksum or sector number is an error, not "no label"; without that type (``wipefs``
zeroes it) the device is not a PV, as for LVM. Every read is bounded by the device size and every loop by the
sector, mda or text size.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from mountd.errors import NotFoundError
from mountd.image.blockio import BlockReader
from mountd.image.lvmconfig import (
    MAX_SEGMENTS,
    MAX_STRIPES,
    ConfigScalar,
    ConfigSection,
    LvmMetadataError,
    parse_config,
)

log = logging.getLogger(__name__)

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_SCAN_SECTORS = 4
INITIAL_CRC = 0xF597A6CF
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_VERSION = 1
MDA_HEADER_SIZE = 512
RAW_LOCN_IGNORED = 0x1
MAX_INT = (1 << 63) - 1

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
_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")


@dataclass(frozen=True, slots=True)
class LvSegment:
    start_extent: int  # first logical extent of the segment within the LV
    extent_count: int
    type: str  # "striped", "thin", "raid1", "mirror", ...
    #: striped segments only: (PV name as in the metadata, e.g. "pv0", or an LV name; first extent)
    stripes: tuple[tuple[str, int], ...]
    stripe_size: int = 0  # bytes; 0 unless striped over more than one area


@dataclass(frozen=True, slots=True)
class LogicalVolume:
    name: str
    uuid: str
    status: tuple[str, ...]  # e.g. ("READ", "WRITE", "VISIBLE")
    segments: tuple[LvSegment, ...]  # sorted by start_extent, contiguous from extent 0
    size: int  # bytes

    @property
    def visible(self) -> bool:
        """Hidden LVs (thin pool internals, raid images, ...) lack the VISIBLE flag."""
        return "VISIBLE" in self.status


@dataclass(frozen=True, slots=True)
class PvRef:
    name: str  # "pv0"
    uuid: str  # with dashes, as LVM prints it
    pe_start: int  # bytes from the start of the PV device
    pe_count: int


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    seqno: int
    extent_size: int  # bytes
    pvs: tuple[PvRef, ...]
    lvs: tuple[LogicalVolume, ...]
    # By name, so that a lookup per LV keeps a walk over a VG's LVs linear.
    _lvs_by_name: Mapping[str, LogicalVolume] = field(init=False, repr=False, compare=False)
    _pvs_by_name: Mapping[str, PvRef] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lvs_by_name", {lv.name: lv for lv in self.lvs})
        object.__setattr__(self, "_pvs_by_name", {pv.name: pv for pv in self.pvs})

    def lv(self, name: str) -> LogicalVolume:
        lv = self._lvs_by_name.get(name)
        if lv is None:
            raise NotFoundError(f"volume group {self.name} has no logical volume {name}")
        return lv

    def linear_extent(self, lv_name: str) -> tuple[str, int, int] | None:
        """(pv uuid, byte offset within that PV device, byte size) when the LV is one linear segment
        (type striped with 1 stripe) on one PV; None otherwise (needs device-mapper).

        The range lies inside the PV's data area (checked when parsing); :func:`read_pv` also checked that
        its own PV's data area fits the device. Raises :class:`NotFoundError` for an unknown LV name.
        """
        lv = self.lv(lv_name)
        if len(lv.segments) != 1 or lv.segments[0].type != "striped" or len(lv.segments[0].stripes) != 1:
            return None
        seg = lv.segments[0]
        pv_name, first = seg.stripes[0]
        pv = self._pvs_by_name.get(pv_name)
        if pv is None:  # stacked on another LV
            return None
        return pv.uuid, pv.pe_start + first * self.extent_size, seg.extent_count * self.extent_size


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


# --- from config to volume group ----------------------------------------------------------------------

def parse_vg(text: bytes) -> VolumeGroup:
    """The volume group described by one metadata text (what LVM writes into a metadata area)."""
    root = parse_config(text)
    if root.get("contents") != "Text Format Volume Group" or root.get("version") != 1:
        raise LvmMetadataError("the metadata text is not LVM2 text format volume group metadata, version 1")
    name, body = next(((k, v) for k, v in root.items() if isinstance(v, dict)), ("", {}))
    if not name:
        raise LvmMetadataError("the LVM metadata text holds no volume group section")
    return _volume_group(name, body)


def _volume_group(name: str, body: ConfigSection) -> VolumeGroup:
    where = f"volume group {_checked_name(name, 'volume group')}"
    extent_size = _int(body, "extent_size", where) * SECTOR
    if extent_size == 0:
        raise LvmMetadataError(f"{where} has an extent size of 0")
    pvs = tuple(_pv_ref(n, s) for n, s in _children(body, "physical_volumes", where, required=True))
    lv_sections = _children(body, "logical_volumes", where, required=False)
    # What a stripe may name: a PV (with its extent count) or an LV stacked on (None).
    areas: dict[str, int | None] = {n: None for n, _ in lv_sections} | {pv.name: pv.pe_count for pv in pvs}
    lvs = tuple(_logical_volume(n, s, extent_size, areas) for n, s in lv_sections)
    return VolumeGroup(name, _str(body, "id", where), _int(body, "seqno", where), extent_size, pvs, lvs)


def _pv_ref(name: str, body: ConfigSection) -> PvRef:
    where = f"physical volume {_checked_name(name, 'physical volume')}"
    pe_start = _int(body, "pe_start", where) * SECTOR
    return PvRef(name, _str(body, "id", where), pe_start, _int(body, "pe_count", where))


def _logical_volume(name: str, body: ConfigSection, extent_size: int,
                    areas: Mapping[str, int | None]) -> LogicalVolume:
    where = f"logical volume {_checked_name(name, 'logical volume')}"
    sections = [(n, s) for n, s in body.items() if isinstance(s, dict)]
    if len(sections) > MAX_SEGMENTS:
        raise LvmMetadataError(f"the LVM metadata gives {where} {len(sections)} segments, more than the "
                               f"{MAX_SEGMENTS} imgmount reads")
    segments = sorted((_segment(s, f"{where} {n}", areas) for n, s in sections),
                      key=lambda seg: seg.start_extent)
    if "segment_count" in body and _int(body, "segment_count", where) != len(segments):
        raise LvmMetadataError(f"{where} has a segment_count that differs from its {len(segments)} segments")
    extents = 0
    for seg in segments:
        if seg.start_extent != extents:
            raise LvmMetadataError(f"the segments of {where} leave a gap or overlap at extent {extents}")
        extents += seg.extent_count
    status = _strs(body, "status", where)
    return LogicalVolume(name, _str(body, "id", where), status, tuple(segments), extents * extent_size)


def _segment(body: ConfigSection, where: str, areas: Mapping[str, int | None]) -> LvSegment:
    start, count = _int(body, "start_extent", where), _int(body, "extent_count", where)
    kind = _str(body, "type", where)
    if count == 0:
        raise LvmMetadataError(f"{where} is empty")
    if kind != "striped":
        return LvSegment(start, count, kind, ())
    stripe_count = _int(body, "stripe_count", where)
    if stripe_count > MAX_STRIPES:
        raise LvmMetadataError(f"the LVM metadata gives {where} {stripe_count} stripes, more than the "
                               f"{MAX_STRIPES} imgmount reads (and lvm writes)")
    flat = body.get("stripes")
    if not isinstance(flat, tuple) or not 0 < stripe_count * 2 == len(flat) or count % stripe_count:
        raise LvmMetadataError(f"{where} has inconsistent stripe_count, stripes and extent_count")
    stripes = tuple(_stripe(name, first, count // stripe_count, where, areas)
                    for name, first in zip(flat[::2], flat[1::2], strict=True))
    stripe_size = _int(body, "stripe_size", where) * SECTOR if stripe_count > 1 else 0
    return LvSegment(start, count, kind, stripes, stripe_size)


def _stripe(name: ConfigScalar, first: ConfigScalar, length: int, where: str,
            areas: Mapping[str, int | None]) -> tuple[str, int]:
    if not isinstance(name, str) or isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise LvmMetadataError(f"{where} has a stripe that is not a name and an extent number")
    if name not in areas:
        raise LvmMetadataError(f"{where} uses {name[:64]!r}, neither a PV nor an LV of the volume group")
    pe_count = areas[name]
    if pe_count is not None and first + length > pe_count:
        raise LvmMetadataError(f"{where} uses extents {first}-{first + length - 1} of {name}, "
                               f"which has only {pe_count}")
    return name, first


def _checked_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise LvmMetadataError(f"the LVM metadata names a {what} {name[:64]!r}, which is not a valid name")
    return name


def _children(body: ConfigSection, key: str, where: str, required: bool) -> list[tuple[str, ConfigSection]]:
    section = body.get(key)
    if section is None and not required:
        return []
    if not isinstance(section, dict):
        raise LvmMetadataError(f"{where} has no {key} section")
    return [(name, value) for name, value in section.items() if isinstance(value, dict)]


def _int(body: ConfigSection, key: str, where: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise LvmMetadataError(f"{where} has no integer {key}")
    if not 0 <= value <= MAX_INT:
        raise LvmMetadataError(f"{where} has {key} = {value}, out of range")
    return value


def _str(body: ConfigSection, key: str, where: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise LvmMetadataError(f"{where} has no string {key}")
    return value


def _strs(body: ConfigSection, key: str, where: str) -> tuple[str, ...]:
    value = body.get(key, ())
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise LvmMetadataError(f"{where} has a {key} that is not a list of strings")
    return tuple(str(v) for v in value)
