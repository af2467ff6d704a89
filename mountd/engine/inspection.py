"""Inspect: everything about an image without mounting anything (design: ``Inspect``).

Reads the image in user space (raw files directly, every other format through a private ``qemu-nbd``), then
runs the pure parsers: partition table, LVM metadata, filesystem signatures; and asks who holds each file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import StrEnum

from mountd.engine.imagekeys import with_image_key
from mountd.engine.windows import info_note
from mountd.host.holders import FileUsage, files_usage
from mountd.host.opener import Credentials, Opener
from mountd.host.support import HostSupport
from mountd.image.blockio import BlockReader, FileReader, SliceReader
from mountd.image.fsprobe import Signature, probe
from mountd.image.imageinfo import ContainedDisk, ImageInfo, block_options, chain_fds, probe_image
from mountd.image.lvmlabel import MetadataTexts, PhysicalVolume, read_pv
from mountd.image.lvmmeta import LogicalVolume, VolumeGroup
from mountd.image.lvmthin import is_thin, is_thin_pool, pool_name
from mountd.image.mdraid import MdArray, MdMember, MdSuperblockError, Placed, group_arrays, read_member
from mountd.image.mdstripes import array_reader
from mountd.image.nbdclient import open_image
from mountd.image.partitions import Partition, PartitionTable, read_partition_table
from mountd.keys import IMAGE, NO_KEYS, Keys
from mountd.layers.server import serving

WHOLE_DISK = "disk"
#: Volumes whose filesystem is probed in one image: far above any real one (GPT has 128 partitions, real VGs
#: tens of LVs); past it volumes are listed unprobed: a crafted VG of 16384 LVs costs ~1 s of blkid, not 35.
MAX_PROBED = 512


class VolumeKind(StrEnum):
    DISK = "disk"
    PARTITION = "partition"
    LV = "lv"
    MD = "md"  # an md RAID array (the data area of a member, for a mirror)


@dataclass(frozen=True)
class Volume:
    """A place that may hold a filesystem: the whole disk, a partition, or an LVM logical volume."""

    name: str  # what ``--volume`` takes: "disk", "p1", "vg/lv", "md/name"
    kind: VolumeKind
    offset: int | None  # bytes from the start of the virtual disk; None: not one linear piece of it
    size: int
    signature: Signature | None
    partition: Partition | None = None
    vg: str = ""  # an LV's volume group, or the VG a PV partition belongs to
    note: str = ""  # what stands in the way of mounting it, or what it is instead (shown, never parsed)
    pv: bool = False  # an LVM physical volume (of ``vg``, if that is known)
    unmapped: str = ""  # an LV or array that is not one piece of the disk: why (it then needs dm or md)
    thin: bool = False  # a thin LV: its filesystem is known only once its pool is mapped
    array: MdArray | None = None  # an md array's members in this image

    @property
    def filesystem(self) -> str:
        return self.signature.type if self.signature and self.signature.usage == "filesystem" else ""


@dataclass(frozen=True)
class DiskLayout:
    """What a virtual disk holds: its partition table, volume groups and volumes."""

    table: PartitionTable | None
    volume_groups: tuple[VolumeGroup, ...]
    volumes: tuple[Volume, ...]

    def volume(self, name: str) -> Volume | None:
        return next((v for v in self.volumes if v.name == name), None)

    def named(self, disk: str) -> DiskLayout:
        """This layout with its volumes' names under ``disk`` (one disk of several: ``disk1/p1``, or
        ``disk1`` for the whole disk); unchanged for ``""``, the one disk of an image."""
        if not disk:
            return self
        volumes = tuple(replace(v, name=disk if v.name == WHOLE_DISK else f"{disk}/{v.name}")
                        for v in self.volumes)
        return replace(self, volumes=volumes)

    @staticmethod
    def merged(layouts: list[DiskLayout]) -> DiskLayout:
        """The volumes of several named disks as one list (their partition tables stay with each disk)."""
        if len(layouts) == 1:
            return layouts[0]
        return DiskLayout(None, tuple(g for x in layouts for g in x.volume_groups),
                          tuple(v for x in layouts for v in x.volumes))


@dataclass(frozen=True)
class InspectedDisk:
    """One disk of an image that holds several (an OVA)."""

    name: str
    label: str
    image: ImageInfo
    layout: DiskLayout  # its volumes named ``<name>/...``


@dataclass(frozen=True)
class Inspection:
    image: ImageInfo
    usage: tuple[FileUsage, ...]  # one per file of image.files()
    layout: DiskLayout
    host: HostSupport | None = None  # what the host that inspected it can do
    disks: tuple[InspectedDisk, ...] = ()  # an OVA's disks (``layout`` then holds all their volumes)

    @property
    def table(self) -> PartitionTable | None:
        return self.layout.table

    @property
    def volume_groups(self) -> tuple[VolumeGroup, ...]:
        return self.layout.volume_groups

    @property
    def volumes(self) -> tuple[Volume, ...]:
        return self.layout.volumes


@dataclass(frozen=True)
class _Region:
    """The whole disk, or one partition: where a filesystem or an LVM physical volume may start."""

    name: str
    offset: int | None  # None: no one piece of the disk (a striped array), read through ``reader``
    size: int
    partition: Partition | None
    pv: PhysicalVolume | None = None
    member: MdMember | None = None  # an md RAID member: its data area is another region (the array's)
    array: MdArray | None = None  # the region is an md array's data (a member's data area, or ``reader``)
    reader: BlockReader | None = None  # a striped array's data, read from its members

    def read_from(self, disk: BlockReader) -> BlockReader:
        if self.reader is not None:
            return self.reader
        assert self.offset is not None
        return SliceReader(disk, self.offset, self.size)


def inspect_image(path: str, *, fmt: str | None = None, confined: Credentials | None = None,
                  host: HostSupport | None = None, keys: Keys = NO_KEYS) -> Inspection:
    """Everything about ``path``, and what ``host`` can do with it; for a ``confined`` caller its files are
    opened, and QEMU runs, as that caller. An image QEMU encrypted is read with ``keys`` (without one, only
    the image itself is described: what it holds is locked)."""
    with Opener(confined) as opener:
        image = probe_image(path, fmt=fmt, opener=opener)
        usage = files_usage(image.files(), opened=opener.by_name())
        if image.disks:
            disks = tuple(_inspect_disk(d, confined) for d in image.disks)
            return Inspection(image, usage, DiskLayout.merged([d.layout for d in disks]), host, disks)
        if image.encryption and not keys.for_volume(IMAGE):
            return Inspection(image, usage, DiskLayout(None, (), ()), host)

        def read(key_fd: int) -> DiskLayout:
            with open_reader(image, confined, key_fd) as disk:
                return analyse_disk(disk)

        return Inspection(image, usage, with_image_key(image, keys, read), host)


def _inspect_disk(disk: ContainedDisk, confined: Credentials | None) -> InspectedDisk:
    with open_reader(disk.info, confined) as reader:
        return InspectedDisk(disk.name, disk.label, disk.info, analyse_disk(reader).named(disk.name))


def analyse_disk(disk: BlockReader) -> DiskLayout:
    """Run the parsers on a virtual disk: partition table, LVM metadata, filesystem signatures."""
    table = read_partition_table(disk)
    regions = _regions(disk, table)
    regions += _array_regions(disk, regions)
    groups = _volume_groups(regions)
    probes = _Probes(disk)
    volumes = [*_region_volumes(probes, regions, table, groups)]
    volumes += [v for vg in groups for v in _vg_volumes(probes, vg, regions)]
    volumes += _unmapped_arrays(regions)
    return DiskLayout(table, tuple(groups), tuple(volumes))


class _Probes:
    """Filesystem probes of one disk's volumes (a ``blkid`` each, ~2 ms), at most :data:`MAX_PROBED`."""

    def __init__(self, disk: BlockReader) -> None:
        self.disk = disk
        self.left = MAX_PROBED

    def probe(self, offset: int, size: int, note: str = "") -> tuple[Signature | None, str]:
        """The signature at that extent, and ``note`` (saying why there is none, past the budget)."""
        return self.probe_reader(SliceReader(self.disk, offset, size), note)

    def probe_reader(self, volume: BlockReader, note: str = "") -> tuple[Signature | None, str]:
        if self.left <= 0:
            return None, f"not probed: imgmount probes at most {MAX_PROBED} volumes of an image"
        self.left -= 1
        signature = probe(volume)
        windows = info_note(signature.type, volume) if signature else ""
        return signature, "; ".join(filter(None, (note, windows)))


@contextlib.contextmanager
def open_reader(image: ImageInfo, confined: Credentials | None = None, key_fd: int = -1,
                ) -> Iterator[BlockReader]:
    """Raw single files are read directly from the descriptor the probe opened; every other format through
    QEMU's block layer (a QEMU of the caller's, for a ``confined`` caller), with the key at ``key_fd``."""
    if image.format == "raw" and len(image.chain) == 1 and image.top.fd >= 0 and image.top.member is None:
        yield FileReader(image.top.fd)
    elif confined is not None:
        opts = block_options(image, force_share=True, by_fd=True)
        with serving(opts, chain_fds(image), confined, image.top.path, key_fd) as reader:
            yield reader
    else:
        with open_image(image, key_fd) as reader:
            yield reader


def _regions(disk: BlockReader, table: PartitionTable | None) -> list[_Region]:
    """The whole disk, or every partition, each with the LVM physical volume it holds if any."""
    bounds: list[tuple[str, int, int, Partition | None]]
    if table is None:
        bounds = [(WHOLE_DISK, 0, disk.size, None)]
    else:
        bounds = [(f"p{p.number}", p.start, p.size, p) for p in table.partitions]
    texts = MetadataTexts()
    regions = []
    for name, offset, size, part in bounds:
        reader = SliceReader(disk, offset, size)
        member = None if part and part.container else _member(name, reader)
        pv = None if (part and part.container) or member else read_pv(reader, texts)
        regions.append(_Region(name, offset, size, part, pv, member))
    return regions


def _member(name: str, reader: SliceReader) -> MdMember | None:
    try:
        return read_member(reader)
    except MdSuperblockError as exc:
        where = "the disk" if name == WHOLE_DISK else f"partition {name}"
        raise MdSuperblockError(f"{where}: {exc}") from None


def _array_regions(disk: BlockReader, regions: list[_Region]) -> list[_Region]:
    """The data of each md array whose members are here: one member's data area where that holds all of it
    (a mirror), else read from every member (:mod:`mountd.image.mdstripes`); its contents are read as any
    region's (a filesystem, or an LVM physical volume). Only md mounts a striped one (offset None)."""
    found = _arrays(regions)
    arrays = []
    for array in found:
        copy, name = array.copy(), array.volume_name(found)
        striped = array_reader(disk, array) if copy is None else None
        if copy is not None:
            reader = SliceReader(disk, copy.data_offset, array.size)
            arrays.append(_Region(name, copy.data_offset, array.size, None, read_pv(reader), array=array))
        elif striped is not None:
            arrays.append(_Region(name, None, array.size, None, read_pv(striped), array=array,
                                  reader=striped))
    return arrays


def _arrays(regions: list[_Region]) -> list[MdArray]:
    return group_arrays([Placed(r.name, r.offset, r.member) for r in regions
                         if r.member is not None and r.offset is not None])


def _unmapped_arrays(regions: list[_Region]) -> list[Volume]:
    """The arrays neither a member holds whole nor we read from their members: only md can assemble them."""
    found = _arrays(regions)
    read = {r.name for r in regions if r.array is not None}
    volumes = []
    for array in found:
        if array.volume_name(found) not in read:
            why = array.obstacle()
            volumes.append(Volume(array.volume_name(found), VolumeKind.MD, None, array.size, None,
                                  note=why, unmapped=why, array=array))
    return volumes


def _volume_groups(regions: list[_Region]) -> list[VolumeGroup]:
    """Each volume group found, from its newest metadata among its physical volumes."""
    newest: dict[str, VolumeGroup] = {}
    for region in regions:
        vg = region.pv.vg if region.pv else None
        if vg is not None and (vg.uuid not in newest or vg.seqno > newest[vg.uuid].seqno):
            newest[vg.uuid] = vg
    return list(newest.values())


def _vg_volumes(probes: _Probes, vg: VolumeGroup, regions: list[_Region]) -> Iterator[Volume]:
    present = {region.pv.uuid: region for region in regions if region.pv}
    missing = [pv.uuid for pv in vg.pvs if pv.uuid not in present]
    for lv in vg.lvs:
        if not lv.visible:
            continue
        name = f"{vg.name}/{lv.name}"
        extent = vg.linear_extent(lv.name)
        if extent is None:
            why = _unmapped(lv)
            yield Volume(name, VolumeKind.LV, None, lv.size, None, vg=vg.name,
                         note=why, unmapped=why, thin=is_thin(lv))  # what that takes: the host (render)
        elif extent[0] not in present:
            why = f"on physical volume {extent[0]}, which is not in this image"
            yield Volume(name, VolumeKind.LV, None, lv.size, None, vg=vg.name,
                         note=f"its physical volume {extent[0]} is not in this image", unmapped=why)
        else:
            region = present[extent[0]]
            missing_note = f"volume group {vg.name} is missing physical volumes" if missing else ""
            if region.offset is None:  # on a striped array: read through it, mapped on md's device
                why = f"on md array {region.name}"
                signature, note = probes.probe_reader(SliceReader(region.read_from(probes.disk), extent[1],
                                                                  extent[2]), missing_note)
                yield Volume(name, VolumeKind.LV, None, extent[2], signature, vg=vg.name,
                             note="; ".join(filter(None, (why, note))), unmapped=why)
                continue
            offset = region.offset + extent[1]
            signature, note = probes.probe(offset, extent[2], missing_note)
            yield Volume(name, VolumeKind.LV, offset, extent[2], signature, vg=vg.name, note=note)


def _unmapped(lv: LogicalVolume) -> str:
    if is_thin(lv):
        return f"a thin volume in thin pool {pool_name(lv)} (thin provisioning)"
    if is_thin_pool(lv):
        return "a thin pool (thin provisioning), which holds thin volumes"
    return "not one linear extent (striped, mirrored or split)"


def _region_volumes(
    probes: _Probes, regions: list[_Region], table: PartitionTable | None, groups: list[VolumeGroup]
) -> Iterator[Volume]:
    vg_names = {vg.uuid: vg.name for vg in groups}
    for r in regions:
        if r.partition is not None and r.partition.container:
            yield Volume(r.name, VolumeKind.PARTITION, r.offset, r.size, None, r.partition,
                         note="extended partition (holds the logical partitions)")
            continue
        kind = VolumeKind.MD if r.array else VolumeKind.PARTITION if table is not None else VolumeKind.DISK
        vg = vg_names.get(r.pv.vg.uuid, "") if r.pv and r.pv.vg else ""
        note = "" if r.pv is None else f"LVM physical volume of {vg}" if vg else "LVM physical volume, no VG"
        unmapped = r.array.obstacle() if r.array and r.offset is None else ""
        md_note = r.member.note if r.member else (unmapped or r.array.note) if r.array else ""
        notes = "; ".join(n for n in (md_note, note) if n)
        signature, note = probes.probe_reader(r.read_from(probes.disk), notes)
        yield Volume(r.name, kind, r.offset, r.size, signature, r.partition, vg=vg, note=note,
                     pv=r.pv is not None, array=r.array, unmapped=unmapped)

