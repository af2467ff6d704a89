"""Which md arrays a mount assembles with mdadm (:mod:`mountd.layers.md`) rather than reading one member's
data area: those whose every member is in the image, where the kernel has md and mdadm is installed. A mirror
missing a member is read degraded from the member present, on any host; other arrays need every member."""

from __future__ import annotations

from mountd.engine.inspection import DiskLayout, Volume, VolumeKind
from mountd.host.mddev import running_uuids
from mountd.host.support import HostSupport


def assembled_here(volume: Volume, host: HostSupport) -> bool:
    """Not when the host runs an array of the same uuid (an image of one of its own disks, or the host's
    incremental assembly got to our members first): mdadm would join our members to that array."""
    array = volume.array
    if volume.kind != VolumeKind.MD or array is None or array.missing() or not host.md_assembly:
        return False
    return array.first.uuid not in running_uuids()


def striped_here(volume: Volume, host: HostSupport) -> bool:
    """An array no member holds whole (striped, parity) that md assembles here: what it holds is known only
    once it is assembled."""
    return volume.kind == VolumeKind.MD and volume.offset is None and assembled_here(volume, host)


def member_volumes(volume: Volume, layout: DiskLayout) -> list[Volume]:
    """The volumes (partitions, or the disk) holding the array's members, in the order found."""
    assert volume.array is not None
    found = [layout.volume(p.region) for p in volume.array.members]
    return [v for v in found if v is not None]
