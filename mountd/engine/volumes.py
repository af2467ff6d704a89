"""One volume of an attached disk: its block device (partition, loop at an offset, or device-mapper LV) and
its mounted filesystem (design: "Partitions", "LVM", "Filesystems").

A read-only mount of a filesystem with writes pending in its journal or log (:mod:`mountd.image.recovery`: a
VM that crashed, a QEMU that was killed) replays them, as the guest's next boot would, without writing to the
image: the volume's block device is read by a ``qemu-storage-daemon`` below a qcow2 overlay that takes every
write (:mod:`mountd.layers.fuse`), and the filesystem is mounted ``ro`` without ``noload``/``norecovery``
from a read-write loop device on that export. The same two layers serve every backend and every kind of
volume. Where that cannot be done (no qemu-storage-daemon or FUSE, or a journal on another device), the mount
goes without the replay, and a warning, and the note recorded with the mount, say that the last writes are not
shown. A caller's own ``-o noload`` (``norecovery``, ``rescue=nologreplay``) means no replay.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mountd.engine.backends import Disk, export_path
from mountd.engine.inspection import WHOLE_DISK, DiskLayout, Volume, VolumeKind
from mountd.engine.lvmapping import LvMapper, probe_node
from mountd.engine.mdarrays import assembled_here, member_volumes, striped_here
from mountd.engine.stack import MountStack
from mountd.engine.unlocking import is_locked, unlock_volume
from mountd.engine.windows import ntfs_note
from mountd.errors import MountdError, UnsupportedError
from mountd.host import fusedrivers
from mountd.host.filesystems import (
    NO_REPLAY,
    NOT_FILESYSTEMS,
    check_mountable,
    mount_options,
    mount_type,
    mountable_types,
    replay_refused,
)
from mountd.host.nbddev import logical_block_size
from mountd.host.support import HostSupport
from mountd.image.recovery import ELSEWHERE, log_name
from mountd.layers.fuse import ExportSpec
from mountd.layers.layer import LayerState
from mountd.layers.loop import LoopSpec
from mountd.layers.md import MdSpec
from mountd.layers.mount import MountSpec, unique_mountpoint
from mountd.layers.nbd import PartitionSpec

if TYPE_CHECKING:  # the engine imports this module
    from mountd.model import MountRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeAttacher:
    """Attaches the volumes of one mount: the stack, the attached disk and what it holds."""

    stack: MountStack
    disk: Disk
    layout: DiskLayout
    request: MountRequest
    root: str
    host: HostSupport

    def mount(self, volume: Volume) -> None:
        """Attach ``volume``'s block device and mount its filesystem under the mount root. A thin volume is
        mapped first (its filesystem shows once it is); a locked volume is unlocked first, and each
        filesystem inside it (one, or its LVs) mounted."""
        if volume.thin or striped_here(volume, self.host):  # what it holds shows once it is mapped
            volume = replace(volume, signature=probe_node(self.node(volume)))
            if not volume.filesystem and not self.request.volumes:
                log.info("volume %s holds no filesystem: not mounted", volume.name)
                return
        unlocked = unlock_volume(self.stack, self.disk, volume, self.request) if is_locked(volume) else []
        for node, inside in unlocked or [("", volume)]:
            self._mount(inside, node)

    def _mount(self, volume: Volume, unlocked: str) -> None:
        if volume.kind == VolumeKind.MD and volume.offset is None and not assembled_here(volume, self.host):
            raise UnsupportedError(f"volume {volume.name} cannot be mounted: {volume.unmapped}")
        if not volume.filesystem:
            what = volume.signature.type if volume.signature else "no filesystem"
            why = f": {NOT_FILESYSTEMS[what]}" if what in NOT_FILESYSTEMS else ""
            raise UnsupportedError(f"volume {volume.name} holds {what}, not a filesystem imgmount can "
                                   f"mount{why}")
        kernel = mountable_types()
        available = fusedrivers.mountable_types(kernel, self.host)
        check_mountable(volume.filesystem, available)
        fstype = mount_type(volume.filesystem, available)
        driver = fusedrivers.driver_for(fstype, kernel, self.host)
        node = unlocked or self.node(volume)
        req = self.request
        replay, note = self._recovery(volume, fstype)
        note = "; ".join(filter(None, (note, ntfs_note(volume.name, node, fstype, read_only=req.read_only))))
        if replay:
            node = self._overlay(volume, node)
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        stem = _stem(self.stack.record.image)
        name = stem if volume.name == WHOLE_DISK else f"{stem}-{volume.name}"
        try:
            options = mount_options(fstype, read_only=req.read_only, requested=req.mount_options,
                                    owner_uid=req.owner, replay=replay)
            if driver is not None:
                options = fusedrivers.driver_options(driver, options, req.mount_options, node)
            mountpoint = unique_mountpoint(self.root, name)
            spec = MountSpec(node, mountpoint, fstype, tuple(options), req.owner, name, note or None,
                             driver.program if driver else "")
            self.stack.push(spec.plan(volume.name))
        except MountdError as exc:
            if replay:
                _suggest_no_replay(exc, fstype)
            raise

    def _recovery(self, volume: Volume, fstype: str) -> tuple[bool, str]:
        """Whether this mount replays the volume's pending journal into an overlay; where it cannot, the
        note that says what the mount does not show."""
        sig, req = volume.signature, self.request
        if not req.read_only or sig is None or not sig.needs_recovery:
            return False, ""
        if replay_refused(req.mount_options):
            log.info("volume %s: its %s is not replayed, as asked", volume.name, log_name(fstype))
            return False, ""
        if sig.recovery == ELSEWHERE:
            why = "that journal is on another device"
        elif not self.host.fuse_exports:
            why = ("replaying it without writing to the image needs qemu-storage-daemon (Debian package "
                   "qemu-system-common) and /dev/fuse")
        else:
            log.info("volume %s: replaying its %s into a throwaway overlay", volume.name, log_name(fstype))
            return True, ""
        note = (f"recent writes are not shown: its {log_name(fstype)} holds writes not yet applied (it was "
                f"not unmounted cleanly), and {why}")
        log.warning("volume %s of %s: %s", volume.name, self.stack.record.image, note)
        return False, note

    def _overlay(self, volume: Volume, node: str) -> str:
        """``node`` read-only below a throwaway qcow2 overlay that takes every write, as a read-write loop
        device: the image's bytes stay as they are."""
        stack = self.stack
        export = export_path(stack.journal.root, f"{stack.record.id}-{len(stack.record.layers)}")
        blockdev = f"driver=host_device,filename={node.replace(',', ',,')}"
        overlay = stack.push(ExportSpec(blockdev, export, read_only=False, snapshot="",
                                        virtual_size=_device_size(node), overlay=True).plan(volume.name)).node
        return stack.push(LoopSpec(overlay, 0, 0, read_only=False, qemu_locks=False).plan(volume.name)).node

    def node(self, volume: Volume) -> str:
        """The block device that exposes ``volume``, attaching what it takes."""
        existing = self._node_of(volume.name)
        if existing:
            return existing
        disk = self.disk
        if volume.kind == VolumeKind.LV:
            return self._lv_node(volume)
        if assembled_here(volume, self.host):
            return self._md_node(volume)
        if volume.kind == VolumeKind.DISK and disk.backend != "fuse":  # an export is a file: it needs a loop
            return disk.node
        if volume.kind == VolumeKind.PARTITION and volume.partition is not None \
                and volume.offset is not None and self._kernel_reads_table():
            spec = PartitionSpec(disk.node, volume.partition.number, volume.offset, volume.size)
            return self.stack.push(spec.plan(volume.name)).node
        return self._loop(volume)

    def _kernel_reads_table(self) -> bool:
        """Whether the kernel's partition nodes can serve. The kernel counts a table's LBAs in the device's
        logical sectors, and ``qemu-nbd -c`` makes those 512 bytes for an image file, so a GPT written for
        4096-byte sectors shows it no partition at all. Then the parser's offsets go on loop devices, as on
        the loop and fuse backends, rather than NBD_SET_BLKSIZE under a device qemu-nbd connected: the table
        is read only after the connect, and every other reader of the whole disk would see it change shape."""
        table = self.layout.table
        return self.disk.kernel_partitions and table is not None and \
            table.sector_size == logical_block_size(os.path.basename(self.disk.node))

    def _md_node(self, volume: Volume) -> str:
        """The array assembled read-only from its members' devices (those of this mount only)."""
        assert volume.array is not None
        members = tuple(self.node(v) for v in member_volumes(volume, self.layout))
        spec = MdSpec(volume.array.first.uuid, members, self.request.read_only)
        return self.stack.push(spec.plan(volume.name)).node

    def _lv_node(self, volume: Volume) -> str:
        if not self.disk.device_mapper:
            if volume.offset is None:
                raise UnsupportedError(f"logical volume {volume.name} is {volume.unmapped}: it "
                                       "needs device-mapper, which this kernel lacks")
            return self._loop(volume)
        vg = next(g for g in self.layout.volume_groups if g.name == volume.vg)
        pv_nodes = {
            region.signature.uuid: self.node(region)
            for region in self.layout.volumes
            if region.vg == vg.name and region.kind != VolumeKind.LV and region.signature is not None
        }
        lv_name = volume.name.rsplit("/", 1)[1]
        disk = volume.name.removesuffix(f"{vg.name}/{lv_name}")  # "disk2/" for "disk2/vg/lv" (an OVA's disk)
        mapper = LvMapper(self.stack, vg, pv_nodes, self.request.read_only, self._node_of, disk)
        return mapper.node(lv_name)

    def _loop(self, volume: Volume) -> str:
        assert volume.offset is not None
        spec = LoopSpec(self.disk.offset_base, volume.offset, volume.size, read_only=self.request.read_only,
                        qemu_locks=False, direct_io=self.disk.backend != "fuse")
        return self.stack.push(spec.plan(volume.name), fds=self.disk.offset_fds).node

    def _node_of(self, volume: str) -> str:
        """The topmost device made for ``volume``: an unlocked volume's crypt device, not its partition."""
        layers = self.stack.record.layers
        attached = [x for x in layers if x.volume == volume and x.state == LayerState.ATTACHED]
        return next((x.node for x in reversed(attached) if x.kind != MountSpec.kind), "")


def _device_size(node: str) -> int:
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _suggest_no_replay(exc: MountdError, fstype: str) -> None:
    exc.message += (f" (while replaying its {log_name(fstype)} into a throwaway overlay: with -o "
                    f"{NO_REPLAY[fstype]} it mounts without the replay, and without the writes it holds)")
    exc.args = (exc.message,)


def _stem(image: str) -> str:
    base = os.path.basename(image)
    return base.split(".", 1)[0] or base

