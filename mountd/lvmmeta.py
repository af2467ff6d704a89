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

import itertools
import logging
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

from .blockio import BlockReader
from .errors import InvalidImageError, NotFoundError

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
#: Far above any real VG (a thousand LVs is a few MB) and keeps a crafted header from allocating gigabytes.
MAX_TEXT_SIZE = 64 << 20
MAX_DEPTH = 16
MAX_INT = (1 << 63) - 1

_LABEL = struct.Struct("<8sQII8s")  # id, sector, crc, offset of the PV header, type
_LOCN = struct.Struct("<QQ")  # disk_locn: offset, size (bytes)
_MDA_HEADER = struct.Struct("<I16sIQQ")  # crc, magic, version, start, size
_RAW_LOCN = struct.Struct("<QQII")  # offset (from mda start), size, text checksum, flags
_PV_UUID = re.compile(rb"[A-Za-z0-9!#]{32}")
_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")


class LvmMetadataError(InvalidImageError):
    """An LVM label, metadata area header or metadata text is corrupt or inconsistent."""


@dataclass(frozen=True)
class LvSegment:
    start_extent: int  # first logical extent of the segment within the LV
    extent_count: int
    type: str  # "striped", "thin", "raid1", "mirror", ...
    #: striped segments only: (PV name as in the metadata, e.g. "pv0", or an LV name; first extent)
    stripes: tuple[tuple[str, int], ...]
    stripe_size: int = 0  # bytes; 0 unless striped over more than one area


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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

    def lv(self, name: str) -> LogicalVolume:
        for lv in self.lvs:
            if lv.name == name:
                return lv
        raise NotFoundError(f"volume group {self.name} has no logical volume {name}")

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
        pv = next((p for p in self.pvs if p.name == pv_name), None)
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


def read_pv(reader: BlockReader) -> PhysicalVolume | None:
    """None when the device has no LVM2 label ("LABELONE" in sectors 0-3, type "LVM2 001")."""
    label = _find_label(reader)
    if label is None:
        return None
    header = _pv_header(label)
    vg = _newest_vg(reader, header.mdas)
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


def _newest_vg(reader: BlockReader, mdas: tuple[tuple[int, int], ...]) -> VolumeGroup | None:
    best: VolumeGroup | None = None
    errors: list[LvmMetadataError] = []
    for start, _size in mdas:
        try:
            vg = _read_mda(reader, start)
        except LvmMetadataError as exc:
            errors.append(exc)
            continue
        if vg is not None and (best is None or vg.seqno > best.seqno):
            best = vg
    if best is None and errors:
        raise errors[0]
    for error in errors:
        log.warning("using another LVM metadata copy: %s", error)
    return best


def _read_mda(reader: BlockReader, start: int) -> VolumeGroup | None:
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
    return parse_vg(text)


def _read_text(reader: BlockReader, start: int, hsize: int, offset: int, length: int) -> bytes:
    """The text at ``offset`` in the circular buffer ``[start + 512, start + hsize)``, unwrapped."""
    where = f"the LVM metadata area at byte {start}"
    if not MDA_HEADER_SIZE <= offset < hsize or not 0 < length <= hsize - MDA_HEADER_SIZE:
        raise LvmMetadataError(f"{where} locates its text outside the area ({length} bytes at {offset})")
    if length > MAX_TEXT_SIZE:
        raise LvmMetadataError(f"{where} holds {length} bytes of text, over the {MAX_TEXT_SIZE} accepted")
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


# --- the metadata text: LVM's config syntax ------------------------------------------------------------

ConfigScalar: TypeAlias = int | float | str
ConfigSection: TypeAlias = dict[str, "ConfigValue"]
ConfigValue: TypeAlias = ConfigScalar | tuple[ConfigScalar, ...] | ConfigSection

_SKIP = re.compile(rb"(?:[ \t\r\n\f\v]+|#[^\n]*)*")
_KEY = re.compile(rb"[^ \t\r\n\f\v#={}\[\],\"'\x00]+")
_NUMBER = re.compile(rb"[+-]?[0-9.]{1,40}")
_DQUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_SQUOTED = re.compile(rb"'([^']*)'")
_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)


def parse_config(text: bytes) -> ConfigSection:
    """Parse LVM config text (``name { key = value ... }``) into nested dicts; LvmMetadataError if malformed.

    Values are ints, floats, strings or tuples of those. Like LVM, parsing stops at the first NUL byte.
    Duplicate keys are refused rather than guessed at. Work is linear in the text size; nesting is capped.
    """
    return _ConfigParser(text.split(b"\0", 1)[0]).parse()


class _ConfigParser:
    def __init__(self, text: bytes) -> None:
        self._text = text
        self._pos = 0

    def parse(self) -> ConfigSection:
        return self._section(0, closed=False)

    def _fail(self, what: str) -> LvmMetadataError:
        return LvmMetadataError(f"the LVM metadata text is malformed at byte {self._pos}: {what}")

    def _peek(self) -> bytes:
        match = _SKIP.match(self._text, self._pos)
        self._pos = match.end() if match else self._pos
        return self._text[self._pos : self._pos + 1]

    def _take(self, pattern: re.Pattern[bytes], what: str) -> re.Match[bytes]:
        match = pattern.match(self._text, self._pos)
        if match is None:
            raise self._fail(what)
        self._pos = match.end()
        return match

    def _section(self, depth: int, closed: bool) -> ConfigSection:
        items: ConfigSection = {}
        while True:  # each pass consumes at least one byte or returns
            char = self._peek()
            if char in (b"", b"}"):
                if (char == b"}") != closed:
                    raise self._fail("a section is not closed" if closed else "'}' without a section")
                self._pos += len(char)
                return items
            key = self._take(_KEY, "expected a name").group().decode("utf-8", "replace")
            char = self._peek()
            self._pos += 1
            value: ConfigValue
            if char == b"{":
                if depth >= MAX_DEPTH:
                    raise self._fail(f"sections nest deeper than {MAX_DEPTH} levels")
                value = self._section(depth + 1, closed=True)
            elif char == b"=":
                value = self._value()
            else:
                self._pos -= 1
                raise self._fail(f"expected '=' or '{{' after {key[:64]!r}")
            if key in items:
                raise self._fail(f"{key[:64]!r} is defined twice")
            items[key] = value

    def _value(self) -> ConfigValue:
        if self._peek() != b"[":
            return self._scalar()
        self._pos += 1
        items: list[ConfigScalar] = []
        if self._peek() == b"]":
            self._pos += 1
            return ()
        while True:
            items.append(self._scalar())
            char = self._peek()
            if char not in (b",", b"]"):
                raise self._fail("expected ',' or ']' in an array")
            self._pos += 1
            if char == b"]":
                return tuple(items)

    def _scalar(self) -> ConfigScalar:
        char = self._peek()
        if char == b'"':
            body = self._take(_DQUOTED, "a string is not closed").group(1)
            return _ESCAPE.sub(rb"\1", body).decode("utf-8", "replace")
        if char == b"'":
            return self._take(_SQUOTED, "a string is not closed").group(1).decode("utf-8", "replace")
        if char and char in b"+-.0123456789":
            token = self._take(_NUMBER, "expected a number").group()
            try:
                return float(token) if b"." in token else int(token)
            except ValueError:
                raise self._fail(f"{token.decode()!r} is not a number") from None
        raise self._fail("expected a value")


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
    segments = sorted((_segment(s, f"{where} {n}", areas) for n, s in body.items() if isinstance(s, dict)),
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
