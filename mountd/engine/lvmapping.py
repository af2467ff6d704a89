"""The logical volumes of one volume group of a mount, as device-mapper devices built from our own reading of
its metadata (design: "LVM"; :mod:`mountd.layers.dm` says why LVM's own activation is never used).

A linear or striped LV is one device over the PVs. A thin LV is a ``thin`` device over its pool's
``thin-pool`` device, which sits over the pool's hidden metadata and data LVs (linear or striped devices):
each is a layer of the mount's stack, pushed once however many thin LVs share the pool, so the teardown
removes them top-down: the thin LVs, the pool, then its data and metadata LVs. A read-only mount maps the pool
``read_only``: the kernel then writes nothing to its metadata, and allocates, zeroes and discards nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mountd.engine.stack import MountStack
from mountd.errors import BusyError
from mountd.host.dmsetup import host_activations, release_host_activations
from mountd.image.blockio import FileReader
from mountd.image.fsprobe import Signature, probe
from mountd.image.lvmmeta import VolumeGroup
from mountd.image.lvmthin import ThinPool, is_thin, is_thin_pool, thin_pool, thin_volume
from mountd.layers.dm import SECTOR, DmSpec, Table, lv_table

log = logging.getLogger(__name__)


def pool_features(pool: ThinPool, *, read_only: bool) -> list[str]:
    """The thin-pool target's feature arguments, in the order the kernel prints them back (``dmsetup table``).

    Read-only: ``read_only`` (no metadata change at all), and neither zeroing nor discards. Read-write: the
    pool's own zeroing and discard settings, and ``error_if_no_space``: no dmeventd of ours extends a full
    pool, so a write it cannot place fails at once instead of queueing (60 s, then failing all the same).
    """
    if read_only:
        return ["skip_block_zeroing", "ignore_discard", "read_only"]
    features = [] if pool.zero_new_blocks else ["skip_block_zeroing"]
    features += {"ignore": ["ignore_discard"], "nopassdown": ["no_discard_passdown"]}.get(pool.discards, [])
    return [*features, "error_if_no_space"]


def pool_table(pool: ThinPool, metadata: str, data: str, *, read_only: bool) -> Table:
    """The thin-pool device of ``pool`` over its ``metadata`` and ``data`` nodes (low water mark 0: nobody of
    ours listens for its event)."""
    features = pool_features(pool, read_only=read_only)
    return [[0, pool.size // SECTOR, "thin-pool", metadata, data, pool.chunk_sectors, 0, len(features),
             *features]]


def thin_table(size: int, pool: str, device_id: int) -> Table:
    """Thin device ``device_id`` of the pool device ``pool``, ``size`` bytes."""
    return [[0, size // SECTOR, "thin", pool, device_id]]


@dataclass(frozen=True)
class LvMapper:
    """Maps the LVs of ``vg`` as layers of ``stack``, on the PV nodes ``pv_nodes`` (PV uuid -> node);
    ``attached`` gives the node a volume already has in the stack ("" if none); ``disk``: the volumes' prefix
    on a disk of several (an OVA's ``disk1/``)."""

    stack: MountStack
    vg: VolumeGroup
    pv_nodes: Mapping[str, str]
    read_only: bool
    attached: Callable[[str], str]
    disk: str = ""

    def node(self, lv_name: str) -> str:
        """The device-mapper node of LV ``lv_name``, mapping it (and what it sits on) unless it is."""
        volume = f"{self.disk}{self.vg.name}/{lv_name}"
        existing = self.attached(volume)
        if existing:
            return existing
        lv = self.vg.lv(lv_name)
        # The disk's name keeps two VGs of one name (disks made from one template, even one uuid) apart.
        disk = f"{dm_name(self.disk.rstrip('/'))}-" if self.disk else ""
        where = f"{self.stack.record.id}-{disk}"
        # The kernel takes a thin-pool in read-write tables only ("always writeable"): a read-only pool is
        # one whose table says read_only (pool_features), over read-only metadata and data devices.
        read_only = self.read_only and not is_thin_pool(lv)
        spec = DmSpec(dm_name(f"imgmount-{where}{self.vg.name}-{lv_name}"), f"IMGMOUNT-{where}{lv.uuid}",
                      read_only, self._table(lv_name))
        return self.stack.push(spec.plan(volume)).node

    def _table(self, lv_name: str) -> Table:
        lv = self.vg.lv(lv_name)
        if is_thin(lv):
            thin = thin_volume(self.vg, lv_name)
            return thin_table(thin.size, self.node(thin.pool.name), thin.device_id)
        if is_thin_pool(lv):
            pool = thin_pool(self.vg, lv_name)
            self._keep_host_away()
            return pool_table(pool, self.node(pool.metadata), self.node(pool.data), read_only=self.read_only)
        return lv_table(self.vg, lv_name, self.pv_nodes)

    def _keep_host_away(self) -> None:
        """A pool the host auto-activated on our PVs (no 60-imgmount.rules) would be a second pool on the same
        metadata: take the host's activation down before ours is made, and refuse while it stays (in use)."""
        removed = release_host_activations(self.pv_nodes.values())
        if removed:
            log.warning("volume group %s: removed the host's activation (%s) before mapping its thin pool",
                        self.vg.name, ", ".join(removed))
        left = host_activations(self.pv_nodes.values())
        if left:
            raise BusyError(f"this host's LVM activated volume group {self.vg.name} of the image itself, and "
                            f"{', '.join(left)} is in use: imgmount maps no second thin pool on the same "
                            "metadata (close it and deactivate the VG; scripts/install's udev rule keeps the "
                            "host's LVM off imgmount's devices)")

def probe_node(node: str) -> Signature | None:
    """What a mapped LV holds, read from its node (a thin LV's bytes are nowhere else to be read)."""
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return probe(FileReader(fd))
    finally:
        os.close(fd)


def dm_name(name: str) -> str:
    """``name`` as a device-mapper name: characters dm takes, at most 120 of them."""
    return re.sub(r"[^A-Za-z0-9_+.-]", "_", name)[:120]
