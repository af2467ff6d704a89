"""The LVM2 volume group model (VolumeGroup, its PVs and logical volumes, their segments and stripes) and
:func:`parse_vg`, which builds it from one metadata text parsed by :mod:`mountd.image.lvmconfig`, checking
names, extent ranges and segment layout. Reading the texts from a PV's metadata areas is
:mod:`mountd.image.lvmlabel`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mountd.errors import NotFoundError
from mountd.image.lvmconfig import (
    MAX_SEGMENTS,
    MAX_STRIPES,
    ConfigScalar,
    ConfigSection,
    LvmMetadataError,
    parse_config,
)

SECTOR = 512  # the unit of the metadata text's sizes and offsets, and of a PV's label sectors
MAX_INT = (1 << 63) - 1

_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")


@dataclass(frozen=True, slots=True)
class LvSegment:
    start_extent: int  # first logical extent of the segment within the LV
    extent_count: int
    type: str  # "striped", "thin", "raid1", "mirror", ...
    #: striped segments only: (PV name as in the metadata, e.g. "pv0", or an LV name; first extent)
    stripes: tuple[tuple[str, int], ...]
    stripe_size: int = 0  # bytes; 0 unless striped over more than one area
    #: other types only: the segment's own keys with a number or string value (a thin LV's "device_id", a
    #: thin pool's "metadata", ...), read by the module that maps that type (:mod:`mountd.image.lvmthin`)
    settings: tuple[tuple[str, int | str], ...] = field(default=(), compare=False)

    def setting(self, key: str) -> int | str | None:
        return next((value for name, value in self.settings if name == key), None)


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

        The range lies inside the PV's data area (checked when parsing); :func:`mountd.image.lvmlabel.read_pv`
        also checked that its own PV's data area fits the device. Raises :class:`NotFoundError` for an unknown
        LV name.
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
        settings = tuple((k, v) for k, v in body.items() if isinstance(v, int | str))
        return LvSegment(start, count, kind, (), settings=settings)
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
