"""Logical volumes as device-mapper devices built from our own reading of the LVM metadata (design: "LVM").

LVM's own activation cannot map two images whose VGs share a name (every stock Ubuntu is "ubuntu-vg"), or a
guest VG named like an active host VG: its dm names ("VG-LV") and uuids ("LVM-<vg uuid><lv uuid>") collide.
Ours never do: the name is "imgmount-<mount id>-<vg>-<lv>" and the uuid "IMGMOUNT-<mount id>-<lv uuid>",
and the table comes from :mod:`mountd.image.lvmmeta`, so nothing is written to either image and no LVM command
ever runs on the guest's VG to map it.

udev: where a udevd answers, ``dmsetup`` synchronises with it (udev makes ``/dev/mapper/NAME``). Where none
does, or ``DM_DISABLE_UDEV=1`` is set in our environment, it runs with ``DM_DISABLE_UDEV=1 --noudevsync`` and
libdevmapper makes the node itself: libdevmapper only checks that ``/run/udev/control`` exists, and would wait
for ever on a udevd that is gone (a stale socket in a container).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from mountd.errors import BusyError, CommandError, FailedError, InvalidArgumentError, UnsupportedError
from mountd.host import command
from mountd.host.blockdev import lock_out_udev
from mountd.image.lvmmeta import VolumeGroup
from mountd.layers.layer import Layer, LayerRecord, Progress
from mountd.layers.nbd import SYS_CLASS_BLOCK, block_holders

log = logging.getLogger(__name__)

SECTOR = 512
DM_TIMEOUT = 60.0
UDEV_CONTROL = "/run/udev/control"
UDEV_RULE_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/lib/udev/rules.d", "/lib/udev/rules.d")
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


# --- dmsetup -----------------------------------------------------------------------------------------------


def udev_running() -> bool:
    """A udevd answers on its control socket (connecting is harmless: it only accepts)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(UDEV_CONTROL)
        except OSError:
            return False
    return True


def _udev_mode() -> tuple[dict[str, str], list[str]]:
    """The environment and extra ``dmsetup`` arguments: see the module docstring. udev synchronisation also
    needs the rule that tells dmsetup udev is done (95-dm-notify.rules); without it dmsetup would wait."""
    notify = any(Path(d, "95-dm-notify.rules").exists() for d in UDEV_RULE_DIRS)
    if os.environ.get("DM_DISABLE_UDEV") == "1" or not notify or not udev_running():
        return {"DM_DISABLE_UDEV": "1"}, ["--noudevsync"]
    return {}, []


@dataclass(frozen=True)
class DmDevice:
    name: str
    uuid: str
    devnum: str  # "major:minor"
    read_only: bool
    open_count: int

    @property
    def sysname(self) -> str:
        """``dm-N``, its name under /sys/block."""
        return os.path.basename(os.path.realpath(f"/sys/dev/block/{self.devnum}"))


def dm_devices() -> list[DmDevice]:
    out = command.run(["dmsetup", "info", "-c", "--noheadings", "--separator", "|",
                       "-o", "name,uuid,major,minor,attr,open"], timeout=DM_TIMEOUT).stdout
    found = []
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) == 6 and fields[2].isdigit() and fields[3].isdigit():  # else a name with "|" in it
            name, uuid, major, minor, attr, count = fields
            found.append(DmDevice(name, uuid, f"{major}:{minor}", attr[3:4] == "r", int(count or 0)))
    return found


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


class DmLinearLayer(Layer):
    """One LV as a device-mapper device.

    Identity in: ``name``, ``uuid``, ``table`` (rows from :func:`lv_table`), ``read_only``. Out: ``node``
    (``/dev/mapper/NAME``) and ``devnum``. Left behind on failure: nothing (libdevmapper removes a device
    whose table did not load; :meth:`detach` removes by uuid whatever a crash left).
    """

    kind = "dm"

    @property
    def _name(self) -> str:
        return str(self.identity["name"])

    @property
    def _uuid(self) -> str:
        return str(self.identity["uuid"])

    def attach(self, progress: Progress) -> LayerRecord:
        if not _NAME.fullmatch(self._name) or not _UUID.fullmatch(self._uuid):
            raise InvalidArgumentError(f"{self._name!r}, {self._uuid!r}: not a device-mapper name and uuid")
        env, extra = _udev_mode()
        argv = ["dmsetup", "create", self._name, "--uuid", self._uuid, *extra]
        if self.identity.get("read_only", True):
            argv.append("--readonly")
        text = "".join(" ".join(str(x) for x in row) + "\n" for row in self.identity["table"])
        try:
            command.run(argv, env=env, input_text=text, timeout=DM_TIMEOUT)
        except CommandError as exc:
            raise FailedError(f"device-mapper would not create {self._name}: "
                              f"{exc.message.split(': ', 1)[-1]}") from None
        device = _find(self._uuid)
        if device is None:
            raise FailedError(f"dmsetup create {self._name} succeeded, yet no device has uuid {self._uuid}")
        node = f"/dev/mapper/{self._name}"
        if not _is_node(node, device.devnum):  # no udev made it (or not yet): make it ourselves
            command.run(["dmsetup", "mknodes", self._name, *extra], env=env, timeout=DM_TIMEOUT)
            if not _is_node(node, device.devnum):
                raise FailedError(f"{node} does not exist after dmsetup mknodes")
        return replace(self.record, state="attached",
                       identity={**self.identity, "node": node, "devnum": device.devnum})

    def verify(self) -> bool:
        device = _find(self._uuid)
        if device is None or device.name != self._name or device.devnum != self.identity.get("devnum"):
            return False
        if device.read_only != bool(self.identity.get("read_only", True)):
            return False
        shown = command.run(["dmsetup", "table", self._name], timeout=DM_TIMEOUT).stdout
        try:
            expected = kernel_table(self.identity["table"])
        except OSError:  # a PV node is gone
            return False
        return [line.split() for line in shown.splitlines() if line.strip()] == expected

    def detach(self, *, force: bool = False) -> None:
        """Remove the device, found by uuid. ``force`` changes nothing: a device in use is never torn from
        under its user (``dmsetup remove --force`` would swap in an error table); the holders are named."""
        device = _find(self._uuid)
        if device is None:
            self._drop_stale_node()
            return
        env, extra = _udev_mode()
        self._wait_for_udev(device)
        device = _find(self._uuid)
        if device is not None and device.open_count > 0:
            raise self._busy(device)
        if device is not None:
            try:
                command.run(["dmsetup", "remove", device.name, *extra], env=env, timeout=DM_TIMEOUT)
            except CommandError as exc:
                if "busy" in exc.stderr.lower():
                    raise self._busy(device) from None
                raise
        if _find(self._uuid) is not None:
            raise FailedError(f"device-mapper device {self._name} is still there after dmsetup remove")
        self._drop_stale_node()

    def _wait_for_udev(self, device: DmDevice) -> None:
        """Let udev finish probing the device (it holds it open meanwhile): take and drop its lock."""
        with contextlib.suppress(OSError):
            fd = os.open(f"/dev/{device.sysname}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                lock_out_udev(fd)
            finally:
                os.close(fd)

    def _busy(self, device: DmDevice) -> BusyError:
        holders = block_holders(device.sysname)
        return BusyError(f"/dev/mapper/{device.name} is in use ({'; '.join(holders) or 'held open'}): "
                         "unmount or close it first")

    def _drop_stale_node(self) -> None:
        node = Path("/dev/mapper", self._name)
        if node.exists():  # without udev, nobody else removes it
            env, extra = _udev_mode()
            command.run(["dmsetup", "mknodes", self._name, *extra], env=env, timeout=DM_TIMEOUT)


# --- LVs the host activated on our devices ---------------------------------------------------------------


def release_host_activations(nodes: Iterable[str]) -> list[str]:
    """Remove the LVs a host's LVM auto-activation mapped on our devices ``nodes``, before they are detached.

    A host's udev rules run ``vgchange -aay`` as soon as a VG's PVs appear, unless systemd/60-imgmount.rules
    is installed; such LVs would keep our devices busy for ever. Only device-mapper devices that LVM made
    (uuid "LVM-...") and that sit on nothing but ``nodes`` (or on each other) are removed, topmost first; one
    in use stays, and the detach below it names it. Reads sysfs only, unless there is something to remove.
    """
    ours = {os.path.basename(os.path.realpath(n)) for n in nodes if n.startswith("/dev/")}
    stacked = _lvm_devices_on(ours)
    if not stacked:
        return []
    removed: list[str] = []
    env, extra = _udev_mode()
    for sysname in stacked:  # topmost first
        name = _sys_read(sysname, "dm/name")
        try:
            command.run(["dmsetup", "remove", name, *extra], env=env, timeout=DM_TIMEOUT)
        except CommandError as exc:
            log.warning("the host activated %s on imgmount's devices and it is in use: %s", name, exc.message)
            break  # everything below it is still needed
        removed.append(name)
    if removed:
        log.warning("the host auto-activated %s on imgmount's devices (is 60-imgmount.rules installed?): "
                    "removed", ", ".join(removed))
    return removed


def _lvm_devices_on(ours: set[str]) -> list[str]:
    """The LVM-made dm devices (sysnames) stacked on ``ours`` alone, topmost first."""
    found: list[str] = []
    frontier = sorted(ours)
    while frontier:
        holders = {h for name in frontier for h in _sys_list(name, "holders")}
        frontier = sorted(h for h in holders - set(found)
                          if _sys_read(h, "dm/uuid").startswith("LVM-")
                          and set(_sys_list(h, "slaves")) <= ours | set(found) | holders)
        found += frontier
    return found[::-1]


def _sys_list(sysname: str, entry: str) -> list[str]:
    try:
        return os.listdir(SYS_CLASS_BLOCK / sysname / entry)
    except OSError:
        return []


def _sys_read(sysname: str, entry: str) -> str:
    try:
        return (SYS_CLASS_BLOCK / sysname / entry).read_text().strip()
    except OSError:
        return ""
