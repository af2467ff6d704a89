"""Logical volumes mapped by ``DmLinearLayer`` from our own LVM metadata parse, on a real kernel: linear,
two-segment and striped LVs; two images whose VGs share name and uuid, mapped at once; a guest VG named like
an active host VG; and deactivating a VG the host activated on our devices, but only there.

The guest image is made with the LVM tools on nbd devices in the lane's kernel (device-mapper exists there,
so ``lvcreate`` activates normally), then deactivated; mapping it again uses no LVM command at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imgmount_testkit import images
from mountd.errors import BusyError, FailedError
from mountd.host import dmlist
from mountd.host.dmlist import DmDevice, dm_devices, dm_table
from mountd.host.dmsetup import UDEV_SYNC, release_host_activations, udev_running
from mountd.image.blockio import FileReader
from mountd.image.lvmlabel import PhysicalVolume, read_pv
from mountd.image.lvmmeta import VolumeGroup
from mountd.layers.dm import DmLinearLayer, lv_table
from mountd.layers.layer import Layer, LayerRecord, LayerState
from tests.support.nbd_layers import attach, nbd_attached, partitions_attached

MiB = images.MiB
VG = "guestvg"
LVS = ("lin", "two", "str")
SHAPES = {"lin": ["linear"], "two": ["linear", "linear"], "str": ["striped"]}
LVM_TYPE = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
NO_BACKUP = "backup { backup = 0 archive = 0 }"


@dataclass(frozen=True)
class Guest:
    a: Path  # qcow2 with VG "guestvg": lin (linear), two (two segments on two PVs), str (striped over both)
    b: Path  # a byte-for-byte copy of a: same VG name, same VG and LV uuids
    files: dict[str, bytes]  # LV name -> the contents of data.bin in its ext4


def lvm(devs: list[str], command: str, *args: str) -> str:
    """An LVM command that sees only ``devs`` and writes no backups (the lane's /etc is not ours)."""
    return images.run([command, "-q", "--devices", ",".join(devs), "--config", NO_BACKUP, *args],
                      env=images.LVM_ENV)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    directory = tmp_path_factory.mktemp("lvm")
    raw = images.blank(directory / "guest.raw", 96 * MiB)
    images.partition(raw, f"label: gpt\nsize=44M, type={LVM_TYPE}\nsize=44M, type={LVM_TYPE}\n")
    files = {lv: os.urandom(100_000) for lv in LVS}
    with nbd_attached(raw, read_only=False) as disk, partitions_attached(disk.node) as parts:
        pvs = [parts[1].node, parts[2].node]
        lvm(pvs, "pvcreate", *pvs)
        lvm(pvs, "vgcreate", "-s", "1m", VG, *pvs)
        try:
            lvm(pvs, "lvcreate", "--yes", "-L", "8m", "-n", "lin", VG, pvs[0])
            lvm(pvs, "lvcreate", "--yes", "-L", "4m", "-n", "two", VG, pvs[0])
            lvm(pvs, "lvcreate", "--yes", "-i", "2", "-I", "64k", "-L", "8m", "-n", "str", VG)
            lvm(pvs, "lvextend", "-L", "+4m", f"{VG}/two", pvs[1])
            for lv in LVS:
                images.mkfs(f"/dev/mapper/{VG}-{lv}", "ext4", label=lv)
                with images.mounted(f"/dev/mapper/{VG}-{lv}") as mnt:
                    (mnt / "data.bin").write_bytes(files[lv])
        finally:
            lvm(pvs, "vgchange", "-an", VG)
    a = images.convert(raw, directory / "a.qcow2", "qcow2")
    raw.unlink()
    return Guest(a, Path(shutil.copy(a, directory / "b.qcow2")), files)


@dataclass(frozen=True)
class Mapped:
    nodes: list[str]  # the PV partition nodes
    vg: VolumeGroup  # as our parser reads it
    lvs: dict[str, Layer[Any]]


def read_pvs(nodes: list[str]) -> list[PhysicalVolume]:
    found = []
    for node in nodes:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pv = read_pv(FileReader(fd))
        finally:
            os.close(fd)
        assert pv is not None and pv.vg is not None, f"no LVM PV with metadata on {node}"
        found.append(pv)
    return found


@contextlib.contextmanager
def mapped(image: Path, mount_id: str, lvs: tuple[str, ...] = LVS) -> Iterator[Mapped]:
    """``image`` on nbd (read-only), its partitions, and ``lvs`` as dm devices named for ``mount_id``."""
    with nbd_attached(image) as disk, partitions_attached(disk.node) as parts:
        nodes = [parts[1].node, parts[2].node]
        pvs = read_pvs(nodes)
        vg = pvs[0].vg
        assert vg is not None
        pv_nodes = {pv.uuid: node for pv, node in zip(pvs, nodes, strict=True)}
        layers: dict[str, Layer[Any]] = {}
        try:
            # The lane's udevd runs Debian's 69-lvm.rules, which auto-activates a VG ("vgchange -aay") when its
            # PVs appear, as a host would: let it, then undo it on our devices, as the engine does.
            images.run(["udevadm", "settle"])
            release_host_activations(nodes)
            for name in lvs:
                lv = vg.lv(name)
                layers[name], _ = attach("dm", f"{VG}/{name}", name=f"imgmount-{mount_id}-{VG}-{name}",
                                         uuid=f"IMGMOUNT-{mount_id}-{lv.uuid}", read_only=True,
                                         table=lv_table(vg, name, pv_nodes))
            yield Mapped(nodes, vg, layers)
        finally:
            for layer in reversed(layers.values()):
                layer.detach()
            release_host_activations(nodes)


def blkid(node: str) -> dict[str, str]:
    out = images.run(["blkid", "-p", "-o", "export", node])
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@contextlib.contextmanager
def mounted_ro(node: str) -> Iterator[Path]:
    with images.mounted(node, read_only=True) as mnt:
        yield mnt


def lvm_active(vg: VolumeGroup) -> list[str]:
    prefix = "LVM-" + vg.uuid.replace("-", "")
    return sorted(d.name for d in dm_devices() if d.uuid.startswith(prefix))


def test_linear_two_segment_and_striped_lvs_show_their_filesystems(guest: Guest) -> None:
    with mapped(guest.a, "m1") as m:
        for name, layer in m.lvs.items():
            assert [row[2] for row in layer.identity["table"]] == SHAPES[name]
            assert layer.node == f"/dev/mapper/imgmount-m1-{VG}-{name}" and layer.verify()
            assert {k: blkid(layer.node)[k] for k in ("TYPE", "LABEL")} == {"TYPE": "ext4", "LABEL": name}
            with mounted_ro(layer.node) as mnt:
                assert (mnt / "data.bin").read_bytes() == guest.files[name]
                with pytest.raises(BusyError, match=f"mounted on {mnt}"):
                    layer.detach()
                assert layer.verify()
        shown = images.run(["dmsetup", "table", f"imgmount-m1-{VG}-str"]).split()
        assert shown[2:5] == ["striped", "2", "128"]  # 2 stripes of 64 KiB (128 sectors)
        assert next(d for d in dm_devices() if d.name == f"imgmount-m1-{VG}-lin").read_only
        layers = list(m.lvs.values())
    assert not [d for d in dm_devices() if d.uuid.startswith("IMGMOUNT-m1-")]
    assert not any(layer.verify() or os.path.exists(layer.node) for layer in layers)
    layers[0].detach()  # idempotent


def test_two_images_with_the_same_vg_name_and_uuid_map_side_by_side(guest: Guest) -> None:
    with mapped(guest.a, "m1") as one, mapped(guest.b, "m2") as two:
        assert one.vg.name == two.vg.name == VG and one.vg.uuid == two.vg.uuid
        for name in ("two", "str"):  # every LV is mapped; these two span both PVs
            with mounted_ro(one.lvs[name].node) as mnt1, mounted_ro(two.lvs[name].node) as mnt2:
                assert (mnt1 / "data.bin").read_bytes() == (mnt2 / "data.bin").read_bytes() == guest.files[name]
        assert all(layer.verify() for m in (one, two) for layer in m.lvs.values())


def test_a_guest_vg_named_like_an_active_host_vg(guest: Guest) -> None:
    # The "host" VG: image b attached read-write and activated the LVM way, as a host's own VG would be.
    with nbd_attached(guest.b, read_only=False) as host_disk, partitions_attached(host_disk.node) as parts:
        host_nodes = [parts[1].node, parts[2].node]
        host_vg = read_pvs(host_nodes)[0].vg
        assert host_vg is not None
        try:
            lvm(host_nodes, "vgchange", "-ay", VG)
            assert lvm_active(host_vg) == [f"{VG}-{lv}" for lv in sorted(LVS)]
            with mapped(guest.a, "m3") as ours:
                with mounted_ro(f"/dev/mapper/{VG}-lin") as host_mnt, mounted_ro(ours.lvs["lin"].node) as mnt:
                    assert (mnt / "data.bin").read_bytes() == (host_mnt / "data.bin").read_bytes()
                # Same VG uuid, but active on devices that are not the guest's: left alone.
                assert release_host_activations([*ours.nodes, *(lv.node for lv in ours.lvs.values())]) == []
                assert len(lvm_active(host_vg)) == 3
                # Activated on devices we attached (as a host's udev rules would): deactivated, ours untouched.
                assert sorted(release_host_activations(host_nodes)) == [f"{VG}-{lv}" for lv in sorted(LVS)]
                assert lvm_active(host_vg) == []
                assert all(layer.verify() for layer in ours.lvs.values())
        finally:
            lvm(host_nodes, "vgchange", "-an", VG)


def dmsetup_info() -> list[DmDevice]:
    """What ``dmsetup info`` shows of every device, in DmDevice's terms."""
    out = images.run(["dmsetup", "info", "-c", "--noheadings", "--separator", "|",
                      "-o", "name,uuid,major,minor,attr,open"])
    rows = (line.split("|") for line in out.splitlines() if line.strip() and "No devices" not in line)
    return [DmDevice(name, uuid, f"{major}:{minor}", attr[3] == "r", int(count))
            for name, uuid, major, minor, attr, count in rows]


def test_the_kernels_answer_is_what_dmsetup_shows(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    """dm_devices() and dm_table() ask the kernel by ioctl: names, uuids, device numbers, read-only, open
    counts and tables are those dmsetup shows, for LVs of two images and one of them mounted; a first buffer
    too small for the answer (made so here) is grown."""
    monkeypatch.setattr(dmlist, "FIRST_BUFFER", 512)  # room for one name
    with mapped(guest.a, "m8") as one, mapped(guest.b, "m9", ("lin",)), mounted_ro(one.lvs["str"].node):
        found = sorted(dm_devices(), key=lambda d: d.name)
        assert found == sorted(dmsetup_info(), key=lambda d: d.name)
        assert {d.name: d.open_count for d in found if d.name.startswith("imgmount-m8-")} == {
            f"imgmount-m8-{VG}-lin": 0, f"imgmount-m8-{VG}-two": 0, f"imgmount-m8-{VG}-str": 1}
        assert len(found) >= 4 and all(d.read_only for d in found if d.name.startswith("imgmount-"))
        for d in found:  # linear, two-segment and striped tables, as dmsetup prints them
            shown = images.run(["dmsetup", "table", d.name])
            assert dm_table(d.name) == [line.split() for line in shown.splitlines()]
    assert dm_table(f"imgmount-m8-{VG}-lin") is None  # gone


def test_udev_makes_the_node_where_udevd_runs(guest: Guest) -> None:
    assert udev_running() and UDEV_SYNC.allowed  # the lane runs as a host does: dmsetup waits for udev
    with mapped(guest.a, "m4", ("lin",)) as m:
        node = m.lvs["lin"].node
        assert m.lvs["lin"].verify() and os.path.islink(node)  # udev's link to ../dm-N
    assert not os.path.lexists(node)


def test_libdevmapper_makes_the_node_where_udev_may_not(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(UDEV_SYNC, "allowed", False)  # as imgmountd with DM_DISABLE_UDEV=1 (a container's)
    with mapped(guest.a, "m7", ("lin",)) as m:
        node = m.lvs["lin"].node
        assert m.lvs["lin"].verify() and stat.S_ISBLK(os.lstat(node).st_mode)
    assert not os.path.lexists(node)


def test_a_table_the_kernel_refuses_leaves_nothing(guest: Guest) -> None:
    with mapped(guest.a, "m5", ()) as m:
        past_the_end = [[0, 8192, "linear", m.nodes[0], 44 * 2048]]  # starts at the end of the 44 MiB PV
        with pytest.raises(FailedError, match="device-mapper would not create imgmount-m5-bad"):
            attach("dm", f"{VG}/bad", name="imgmount-m5-bad", uuid="IMGMOUNT-m5-bad", read_only=True,
                   table=past_the_end)
        assert not [d for d in dm_devices() if d.uuid == "IMGMOUNT-m5-bad"]
        assert not os.path.exists("/dev/mapper/imgmount-m5-bad")


def test_a_record_of_a_dm_device_never_made_detaches_as_a_no_op() -> None:
    never = DmLinearLayer(LayerRecord("dm", f"{VG}/lin", LayerState.ATTACHING, {
        "name": "imgmount-m6-never", "uuid": "IMGMOUNT-m6-never", "read_only": True, "table": []}))
    never.detach()
    assert not never.verify()
