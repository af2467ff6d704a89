"""Which md arrays a mount assembles with mdadm (:mod:`mountd.layers.md`) rather than reading one member's
data area: those whose every member is in the image, where the kernel has md and mdadm is installed. A mirror
missing a member is read degraded from the member present, on any host; other arrays need every member."""

from __future__ import annotations

from mountd.engine.inspection import DiskLayout, Volume, VolumeKind
from mountd.host.support import HostSupport


def assembled_here(volume: Volume, host: HostSupport) -> bool:
    array = volume.array
    return volume.kind == VolumeKind.MD and array is not None and not array.missing() and host.md_assembly


def member_volumes(volume: Volume, layout: DiskLayout) -> list[Volume]:
    """The volumes (partitions, or the disk) holding the array's members, in the order found."""
    assert volume.array is not None
    found = [layout.volume(p.region) for p in volume.array.members]
    return [v for v in found if v is not None]
