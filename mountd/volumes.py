"""One volume of an attached disk: its block device (partition, loop at an offset, or device-mapper LV) and
its mounted filesystem (design: "Partitions", "LVM", "Filesystems")."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .backends import Disk
from .dm import lv_table
from .errors import UnsupportedError
from .filesystems import check_mountable, mount_options, mount_type
from .inspect import DiskLayout, Volume
from .journal import LayerRecord
from .mounts import unique_mountpoint
from .stack import MountStack

if TYPE_CHECKING:  # the engine imports this module
    from .model import MountRequest


@dataclass(frozen=True)
class VolumeAttacher:
    """Attaches the volumes of one mount: the stack, the attached disk and what it holds."""

    stack: MountStack
    disk: Disk
    layout: DiskLayout
    request: MountRequest
    root: str

    def mount(self, volume: Volume) -> None:
        """Attach ``volume``'s block device and mount its filesystem under the mount root."""
        if not volume.filesystem:
            what = volume.signature.type if volume.signature else "no filesystem"
            raise UnsupportedError(f"volume {volume.name} holds {what}, not a filesystem imgmount can mount")
        check_mountable(volume.filesystem)
        fstype = mount_type(volume.filesystem)
        node = self.node(volume)
        req = self.request
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        stem = _stem(self.stack.record.image)
        name = stem if volume.kind == "disk" else f"{stem}-{volume.name}"
        self.stack.push(LayerRecord("mount", volume.name, "attaching", {
            "device": node, "mountpoint": unique_mountpoint(self.root, name), "fstype": fstype,
            "owner": req.owner,
            "options": mount_options(fstype, read_only=req.read_only,
                                     requested=req.mount_options, owner_uid=req.owner),
        }))

    def node(self, volume: Volume) -> str:
        """The block device that exposes ``volume``, attaching what it takes."""
        existing = self._node_of(volume.name)
        if existing:
            return existing
        disk = self.disk
        if volume.kind == "lv":
            return self._lv_node(volume)
        if volume.kind == "disk" and disk.backend != "fuse":  # the FUSE export is a file: it needs a loop
            return disk.node
        if volume.kind == "partition" and disk.kernel_partitions and volume.partition is not None:
            return self.stack.push(LayerRecord("partition", volume.name, "attaching", {
                "parent": disk.node, "number": volume.partition.number, "start": volume.offset,
                "size": volume.size})).node
        return self._loop(volume)

    def _lv_node(self, volume: Volume) -> str:
        if not self.disk.device_mapper:
            if volume.offset is None:
                raise UnsupportedError(f"logical volume {volume.name} is {volume.note.split(':')[0]}: it "
                                       "needs device-mapper, which this kernel lacks")
            return self._loop(volume)
        vg = next(g for g in self.layout.volume_groups if g.name == volume.vg)
        pv_nodes = {
            region.signature.uuid: self.node(region)
            for region in self.layout.volumes
            if region.vg == vg.name and region.kind != "lv" and region.signature is not None
        }
        lv_name = volume.name.split("/", 1)[1]
        lv = next(x for x in vg.lvs if x.name == lv_name)
        mount_id = self.stack.record.id
        return self.stack.push(LayerRecord("dm", volume.name, "attaching", {
            "name": _dm_name(f"imgmount-{mount_id}-{vg.name}-{lv_name}"),
            "uuid": f"IMGMOUNT-{mount_id}-{lv.uuid}", "read_only": self.request.read_only,
            "table": lv_table(vg, lv_name, pv_nodes)})).node

    def _loop(self, volume: Volume) -> str:
        assert volume.offset is not None
        return self.stack.push(LayerRecord("loop", volume.name, "attaching", {
            "backing": self.disk.offset_base, "offset": volume.offset, "size": volume.size,
            "read_only": self.request.read_only, "qemu_locks": False,
            "direct_io": self.disk.backend != "fuse"}), fds=self.disk.offset_fds).node

    def _node_of(self, volume: str) -> str:
        return next((str(x.identity.get("node", "")) for x in self.stack.record.layers
                     if x.volume == volume and x.kind != "mount" and x.state == "attached"), "")


def _stem(image: str) -> str:
    base = os.path.basename(image)
    return base.split(".", 1)[0] or base


def _dm_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_+.-]", "_", name)[:120]
