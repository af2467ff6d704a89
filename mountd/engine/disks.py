"""Which disks of an image one mount attaches: the one disk of an ordinary image, or an OVA's disks.

An OVA's disks are attached one after the other on the same stack, each by its own layer (a QEMU of its own
reading its bytes of the archive); their volumes are named after their disk (``disk1/p1``, ``disk2``), so
each mounted volume, and every layer below it, belongs to exactly one disk in the journal's record.
"""

from __future__ import annotations

from collections.abc import Sequence

from mountd.engine.volumes import VolumeAttacher
from mountd.errors import NotFoundError, echo
from mountd.image.imageinfo import ContainedDisk, ImageInfo


def wanted_disks(info: ImageInfo, names: Sequence[str]) -> list[ContainedDisk]:
    """Every disk of ``info``, or those that hold the volumes ``names`` (an error for a disk it lacks)."""
    if not info.disks:
        return [ContainedDisk("", "", info)]
    if not names:
        return list(info.disks)
    unknown = [n for n in names if not any(_on(n, d) for d in info.disks)]
    if unknown:
        raise NotFoundError(f"no volume named {echo(', '.join(unknown))} in this OVA: its volumes are named "
                            f"after their disk ({', '.join(d.name for d in info.disks)}), e.g. "
                            f"{info.disks[0].name}/p1 (imgmount --info lists them)")
    return [d for d in info.disks if any(_on(n, d) for n in names)]


def attacher_of(attachers: Sequence[VolumeAttacher], volume: str) -> VolumeAttacher:
    """The attacher of the disk that holds ``volume``."""
    return next(a for a in attachers if a.layout.volume(volume) is not None)


def _on(volume: str, disk: ContainedDisk) -> bool:
    return volume == disk.name or volume.startswith(f"{disk.name}/")
