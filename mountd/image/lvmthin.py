"""Thin provisioning in a volume group's metadata: a thin LV, the thin pool it lives in, and the pool's hidden
metadata (``_tmeta``) and data (``_tdata``) LVs, read from the segments :mod:`mountd.image.lvmmeta` parsed and
checked as the kernel's dm-thin targets take them (Documentation/admin-guide/device-mapper/
thin-provisioning.rst). Nothing here reads the pool's own btrees: the kernel does, once the pool is mapped.

Checked lazily, per LV: a crafted thin segment makes that one LV unmappable, not the whole VG unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass

from mountd.errors import MountdError, UnsupportedError
from mountd.image.lvmconfig import LvmMetadataError
from mountd.image.lvmmeta import LogicalVolume, LvSegment, VolumeGroup

#: dm-thin's data block size bounds, in 512-byte sectors: 64 KiB to 1 GiB, in multiples of 64 KiB.
MIN_CHUNK = 128
MAX_CHUNK = 2097152
#: A thin device's id is 24 bits wide in the pool's metadata.
MAX_DEVICE_ID = (1 << 24) - 1
#: What LVM writes as a pool's ``discards`` (lvm2's lib/thin/thin.c).
DISCARDS = ("passdown", "nopassdown", "ignore")


@dataclass(frozen=True)
class ThinPool:
    name: str  # the pool LV ("pool00")
    metadata: str  # its hidden metadata LV ("pool00_tmeta")
    data: str  # its hidden data LV ("pool00_tdata")
    chunk_sectors: int  # the data block size
    zero_new_blocks: bool
    discards: str  # one of DISCARDS
    size: int  # bytes: the pool LV's size, that of its data LV


@dataclass(frozen=True)
class ThinVolume:
    name: str
    pool: ThinPool
    device_id: int  # the thin device's id in the pool's metadata
    size: int  # bytes: the virtual size


def is_thin(lv: LogicalVolume) -> bool:
    return any(seg.type == "thin" for seg in lv.segments)


def is_thin_pool(lv: LogicalVolume) -> bool:
    return any(seg.type == "thin-pool" for seg in lv.segments)


def pool_name(lv: LogicalVolume) -> str:
    """The pool a thin LV's segment names ("" if none): for notes, unchecked."""
    name = lv.segments[0].setting("thin_pool") if lv.segments else None
    return name[:128] if isinstance(name, str) else ""


def thin_volume(vg: VolumeGroup, lv_name: str) -> ThinVolume:
    """Thin LV ``lv_name`` and its pool, checked; raises :class:`LvmMetadataError` for metadata that is not
    what LVM writes, :class:`UnsupportedError` for what imgmount does not map (an external origin)."""
    lv = vg.lv(lv_name)
    where = f"thin volume {vg.name}/{lv.name}"
    seg = _only_segment(lv, "thin", where)
    if seg.setting("external_origin") is not None:
        raise UnsupportedError(f"{where} is a snapshot of an external origin: imgmount maps thin volumes "
                               "that live wholly in their pool only")
    device_id = _int(seg, "device_id", where, 0, MAX_DEVICE_ID)
    name = seg.setting("thin_pool")
    if not isinstance(name, str):
        raise LvmMetadataError(f"{where} names no thin pool")
    return ThinVolume(lv.name, thin_pool(vg, name), device_id, lv.size)


def thin_pool(vg: VolumeGroup, name: str) -> ThinPool:
    """Thin pool ``name``, checked: its metadata and data LVs exist and are linear or striped."""
    where = f"thin pool {vg.name}/{name[:128]}"
    seg = _only_segment(_lv(vg, name, where), "thin-pool", where)
    subs = []
    for key, role in (("metadata", "metadata"), ("pool", "data")):
        sub = seg.setting(key)
        if not isinstance(sub, str) or sub == name:
            raise LvmMetadataError(f"{where} names no {role} volume of its own")
        kinds = {s.type for s in _lv(vg, sub, where).segments}
        if kinds != {"striped"}:
            raise UnsupportedError(f"{where} keeps its {role} on {sub}, a {'/'.join(sorted(kinds))} volume: "
                                   "imgmount maps thin pools on linear and striped volumes only")
        subs.append(sub)
    chunk = _int(seg, "chunk_size", where, MIN_CHUNK, MAX_CHUNK)
    if chunk % MIN_CHUNK:
        raise LvmMetadataError(f"{where} has a chunk size of {chunk} sectors, not a multiple of {MIN_CHUNK}")
    discards = seg.setting("discards") or "passdown"
    if discards not in DISCARDS:
        raise LvmMetadataError(f"{where} has discards = {str(discards)[:32]!r}, not one of "
                               f"{', '.join(DISCARDS)}")
    return ThinPool(name, subs[0], subs[1], chunk, seg.setting("zero_new_blocks") != 0, str(discards),
                    vg.lv(name).size)


def _lv(vg: VolumeGroup, name: str, where: str) -> LogicalVolume:
    try:
        return vg.lv(name)
    except MountdError:
        raise LvmMetadataError(f"{where} uses {name[:128]!r}, which is not a logical volume of the "
                               "volume group") from None


def _only_segment(lv: LogicalVolume, kind: str, where: str) -> LvSegment:
    if len(lv.segments) != 1 or lv.segments[0].type != kind:
        raise LvmMetadataError(f"{where} is not one {kind} segment, as LVM writes it")
    return lv.segments[0]


def _int(seg: LvSegment, key: str, where: str, low: int, high: int) -> int:
    value = seg.setting(key)
    if not isinstance(value, int) or not low <= value <= high:
        raise LvmMetadataError(f"{where} has no {key} from {low} to {high}")
    return value
