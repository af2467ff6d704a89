"""Logical volumes as device-mapper devices built from our own reading of the LVM metadata (design: "LVM").

LVM's own activation cannot map two images whose VGs share a name (every stock Ubuntu is "ubuntu-vg"), or a
guest VG named like an active host VG: its dm names ("VG-LV") and uuids ("LVM-<vg uuid><lv uuid>") collide.
Ours never do: the name is "imgmount-<mount id>-<vg>-<lv>" and the uuid "IMGMOUNT-<mount id>-<lv uuid>"
(with "<disk>-" after the mount id on a disk of several, an OVA's),
and the table comes from :mod:`mountd.image.lvmmeta`, so nothing is written to either image and no LVM command
ever runs on the guest's VG to map it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from mountd.errors import CommandError, FailedError, InvalidArgumentError, UnsupportedError
from mountd.host import command
from mountd.host.dmlist import DmDevice, dm_devices, dm_table
from mountd.host.dmsetup import DM_TIMEOUT, remove_past_udev, udev_mode
from mountd.image.lvmmeta import VolumeGroup
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec

log = logging.getLogger(__name__)

SECTOR = 512
_NAME = re.compile(r"[A-Za-z0-9_+.-]{1,127}")
_UUID = re.compile(r"[A-Za-z0-9_+.:#-]{1,128}")

Table = list[list[str | int]]


def lv_table(vg: VolumeGroup, lv_name: str, pv_nodes: Mapping[str, str]) -> Table:
    """The device-mapper table of LV ``lv_name``: one line per segment, ``linear`` for one stripe and
    ``striped`` for several, each area on the node of its PV (``pv_nodes``: PV uuid -> node; dashes in the
    uuid do not matter)."""
    lv = vg.lv(lv_name)
    where = f"logical volume {vg.name}/{lv.name}"
    only = "imgmount maps linear and striped LVs only"
    extent = vg.extent_size // SECTOR
    nodes = {uuid.replace("-", ""): node for uuid, node in pv_nodes.items()}
    pvs = {pv.name: pv for pv in vg.pvs}
    table: Table = []
    for seg in lv.segments:
        if seg.type != "striped":
            raise UnsupportedError(f"{where} is a {seg.type} volume: {only}")
        areas: list[str | int] = []
        for area, first in seg.stripes:
            pv = pvs.get(area)
            if pv is None:
                raise UnsupportedError(f"{where} is stacked on logical volume {area}: {only}")
            node = nodes.get(pv.uuid.replace("-", ""))
            if node is None:
                raise UnsupportedError(f"{where} uses physical volume {pv.uuid}, which is not in this image")
            areas += [node, pv.pe_start // SECTOR + first * extent]
        start, length = seg.start_extent * extent, seg.extent_count * extent
        if len(seg.stripes) == 1:
            table.append([start, length, "linear", *areas])
        else:
            table.append([start, length, "striped", len(seg.stripes), seg.stripe_size // SECTOR, *areas])
    return table


def _find(uuid: str) -> DmDevice | None:
    return next((d for d in dm_devices() if d.uuid == uuid), None)


def _devnum(node: str) -> str:
    rdev = os.stat(node).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _is_node(node: str, devnum: str) -> bool:
    try:
        return _devnum(node) == devnum
    except OSError:
        return False


def kernel_table(table: Table) -> list[list[str]]:
    """``table`` as ``dmsetup table`` prints it: device paths become "major:minor"."""
    return [[_devnum(x) if isinstance(x, str) and x.startswith("/dev/") else str(x) for x in row]
            for row in table]


# --- the layer ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DmSpec(Spec):
    kind: ClassVar[str] = "dm"

    name: str
    uuid: str
    read_only: bool
    table: Table  # rows from :func:`lv_table`

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "read_only": self.read_only, "table": self.table}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> DmSpec:
        try:
            return cls(str(identity["name"]), str(identity["uuid"]), bool(identity.get("read_only", True)),
                       [list(row) for row in identity["table"]])
        except (KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"bad dm layer plan: {exc}") from None


class DmLinearLayer(Layer[DmDevice]):
    """One LV as a device-mapper device.

    Identity in: ``name``, ``uuid``, ``table`` (rows from :func:`lv_table`), ``read_only``. Out: ``node``
    (``/dev/mapper/NAME``) and ``devnum``. Left behind on failure: nothing (libdevmapper removes a device
    whose table did not load; :meth:`detach` removes by uuid whatever a crash left).
    """

    kind = DmSpec.kind

    @property
    def _spec(self) -> DmSpec:
        return DmSpec.parse(self.identity)

    @property
    def _name(self) -> str:
        return self._spec.name

    @property
    def _uuid(self) -> str:
        return self._spec.uuid

    def _attach(self, progress: Progress) -> LayerRecord:
        spec = self._spec
        if not _NAME.fullmatch(spec.name) or not _UUID.fullmatch(spec.uuid):
            raise InvalidArgumentError(f"{spec.name!r}, {spec.uuid!r}: not a device-mapper name and uuid")
        env, extra = udev_mode()
        argv = ["dmsetup", "create", spec.name, "--uuid", spec.uuid, *extra]
        if spec.read_only:
            argv.append("--readonly")
        text = "".join(" ".join(str(x) for x in row) + "\n" for row in spec.table)
        try:
            command.run(argv, env=env, input_text=text, timeout=DM_TIMEOUT)
        except CommandError as exc:
            raise FailedError(f"device-mapper would not create {spec.name}: "
                              f"{exc.message.split(': ', 1)[-1]}") from None
        device = _find(spec.uuid)
        if device is None:
            raise FailedError(f"dmsetup create {spec.name} succeeded, yet no device has uuid {spec.uuid}")
        node = f"/dev/mapper/{spec.name}"
        if not _is_node(node, device.devnum):  # no udev made it (or not yet): make it ourselves
            command.run(["dmsetup", "mknodes", spec.name, *extra], env=env, timeout=DM_TIMEOUT)
            if not _is_node(node, device.devnum):
                raise FailedError(f"{node} does not exist after dmsetup mknodes")
        return replace(self.record, identity={**self.identity, "node": node, "devnum": device.devnum})

    def verify(self) -> bool:
        spec = self._spec
        device = _find(spec.uuid)
        if device is None or device.name != spec.name or device.devnum != self.identity.get("devnum"):
            return False
        if device.read_only != spec.read_only:
            return False
        try:
            expected = kernel_table(spec.table)
        except OSError:  # a PV node is gone
            return False
        return dm_table(spec.name) == expected

    def _present(self) -> DmDevice | None:
        return _find(self._uuid)

    def _release(self, device: DmDevice, *, force: bool) -> None:
        """Remove the device, found by uuid. ``force`` changes nothing: a device in use is never torn from
        under its user (``dmsetup remove --force`` would swap in an error table); the holders are named."""
        env, extra = udev_mode()

        def remove(name: str) -> None:
            command.run(["dmsetup", "remove", name, *extra], env=env, timeout=DM_TIMEOUT)

        remove_past_udev(device, lambda: _find(self._uuid), remove)
        if _find(self._uuid) is not None:
            raise FailedError(f"device-mapper device {self._name} is still there after dmsetup remove")

    def _clean_up(self) -> None:
        self._drop_stale_node()

    def _drop_stale_node(self) -> None:
        node = Path("/dev/mapper", self._name)
        if node.exists():  # without udev, nobody else removes it
            env, extra = udev_mode()
            command.run(["dmsetup", "mknodes", self._name, *extra], env=env, timeout=DM_TIMEOUT)
