"""OVA appliances on this host (fuse backend): every disk read in place from the archive, as VirtualBox
exports them (streamOptimized VMDKs, an OVF with DiskSection and References, a SHA256 manifest, ustar with
the descriptor first); and the VMDK taken out of one and renamed (issue 10, item 3)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.bus import world_dir
from imgmount_testkit.ova import build_ova, ovf_descriptor, vmdk_name
from mountd.engine.engine import Engine
from mountd.engine.inspection import inspect_image
from mountd.errors import InvalidImageError, NotFoundError, UnsupportedError
from mountd.host.opener import Credentials
from mountd.layers.layer import InjectedFault
from mountd.model import MountInfo, MountRequest
from mountd.settings import Settings
from tests.support import guests, leftovers
from tests.support.engines import engine_in
from tests.support.guests import Guest

CALLER = "daemon"  # an existing unprivileged account


@dataclass(frozen=True)
class Appliance:
    ova: Path
    disks: tuple[Guest, Guest]  # disk1: MBR with logical partitions; disk2: ext4 on the whole disk

    def files(self) -> dict[str, dict[str, bytes]]:
        """What each volume of the OVA shows, by its name in the OVA."""
        mbr, whole = self.disks
        return {**{f"disk1/{v}": dict(f) for v, f in mbr.files.items()}, "disk2": dict(whole.files["disk"])}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Appliance:
    work = tmp_path_factory.mktemp("ova")
    mbr, whole = guests.mbr_guest(work / "one.raw"), guests.whole_disk_guest(work / "two.raw")
    return Appliance(build_ova(work, "appliance", [mbr.raw, whole.raw]), (mbr, whole))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with engine_in(tmp_path / "state") as eng:
        yield eng


def mount(engine: Engine, image: Path, root: Path, **kw: object) -> MountInfo:
    return engine.mount(MountRequest(image=str(image), mount_root=str(root), **kw))  # type: ignore[arg-type]


def check_files(info: MountInfo, expected: dict[str, dict[str, bytes]]) -> None:
    assert sorted(v.name for v in info.volumes) == sorted(expected)
    for v in info.volumes:
        guests.check_files(Path(v.mountpoint), expected[v.name])


def mine(before: leftovers.Snapshot, tmp_path: Path) -> list[str]:
    """What is left of this test's own devices, mounts and QEMU processes (others' run meanwhile)."""
    return [x for x in leftovers.snapshot().new_since(before) if str(tmp_path) in x]


def test_info_lists_every_disk_with_its_size(appliance: Appliance) -> None:
    ins = inspect_image(str(appliance.ova))
    assert ins.image.format == "ova"
    assert [(d.name, d.label, d.image.format, d.image.virtual_size) for d in ins.disks] == [
        ("disk1", "vmdisk1", "vmdk", 160 << 20), ("disk2", "vmdisk2", "vmdk", 64 << 20)]
    assert {v.name: v.filesystem for v in ins.volumes if v.filesystem} == {
        "disk1/p1": "ext4", "disk1/p5": "ext4", "disk1/p6": "xfs", "disk2": "ext4"}
    imgmount = str(Path(sys.executable).parent / "imgmount")
    text = subprocess.run([imgmount, "--info", str(appliance.ova)], capture_output=True, text=True, check=True)
    assert f"disk1 (vmdisk1, file {vmdk_name('appliance', 1)}" in text.stdout
    assert "vmdk, 64 MiB virtual" in text.stdout and "disk1/p6" in text.stdout
    data = json.loads(subprocess.run([imgmount, "--info", "--json", str(appliance.ova)], capture_output=True,
                                     text=True, check=True).stdout)
    assert [(d["name"], d["file"], d["virtual-size"]) for d in data["disks"]] == [
        ("disk1", vmdk_name("appliance", 1), 160 << 20), ("disk2", vmdk_name("appliance", 2), 64 << 20)]
    assert data["disks"][0]["partition-table"]["label"] == "dos"


def test_mounting_an_ova_mounts_every_disk_in_place(engine: Engine, appliance: Appliance, tmp_path: Path) -> None:
    before = leftovers.snapshot()
    info = mount(engine, appliance.ova, tmp_path / "media")
    assert (info.format, info.backend) == ("ova", "fuse")
    check_files(info, appliance.files())
    exports = [x for x in engine.journal.read(info.id).layers if x.kind == "fuse"]
    assert [x.identity["blockdev"].split(",")[:2] for x in exports] == [["driver=vmdk", "file.driver=raw"]] * 2
    restarted = Engine(engine.journal)  # what a daemon started anew finds: both disks' layers, verified
    assert restarted.verify(info.id) == [] and restarted.clean_up(info.id) == info
    engine.unmount(info.id)
    assert mine(before, tmp_path) == [] and engine.mounts() == []
    assert not (tmp_path / "media").exists() or list((tmp_path / "media").iterdir()) == []


def test_volumes_named_by_disk_attach_only_that_disk(engine: Engine, appliance: Appliance, tmp_path: Path) -> None:
    info = mount(engine, appliance.ova, tmp_path / "media", volumes=("disk2",))
    check_files(info, {"disk2": appliance.files()["disk2"]})
    assert len([x for x in engine.journal.read(info.id).layers if x.kind == "fuse"]) == 1
    engine.unmount(info.id)
    with pytest.raises(NotFoundError, match=r"no volume named disk3/p1 in this OVA: .*\(disk1, disk2\)"):
        mount(engine, appliance.ova, tmp_path / "media", volumes=("disk3/p1",))
    with pytest.raises(NotFoundError, match=r"no volume named disk1/p9 .*disk1/p1"):
        mount(engine, appliance.ova, tmp_path / "media", volumes=("disk1/p9",))
    with pytest.raises(UnsupportedError, match="loop backend maps raw images only, and this one is ova"):
        mount(engine, appliance.ova, tmp_path / "media", backend="loop")
    assert engine.mounts() == []


def test_a_callers_ova_is_served_by_her_own_qemus(engine: Engine, appliance: Appliance) -> None:
    """A non-root caller: each disk by a qemu-storage-daemon of hers, reading the archive she opened."""
    user = pwd.getpwnam(CALLER)
    home = world_dir("imgmount-ova-")
    try:
        image = home / "appliance.ova"
        shutil.copyfile(appliance.ova, image)
        os.chown(image, user.pw_uid, user.pw_gid)
        hers = Credentials(user.pw_uid, (user.pw_gid,))
        assert [d.name for d in inspect_image(str(image), confined=hers).disks] == ["disk1", "disk2"]
        info = engine.mount(MountRequest(image=str(image), mount_root=str(home / "media"), owner=user.pw_uid),
                            confined=hers)
        servers = [x for x in engine.journal.read(info.id).layers if x.kind == "server"]
        assert [x.identity["uid"] for x in servers] == [user.pw_uid] * 2
        check_files(info, appliance.files())
        engine.unmount(info.id)
    finally:
        shutil.rmtree(home)


def test_the_vmdk_taken_out_of_an_ova_and_renamed(engine: Engine, appliance: Appliance, tmp_path: Path) -> None:
    subprocess.run(["tar", "-xf", str(appliance.ova), "-C", str(tmp_path), vmdk_name("appliance", 1)], check=True)
    renamed = (tmp_path / vmdk_name("appliance", 1)).rename(tmp_path / "my-vm.vmdk")
    info = mount(engine, renamed, tmp_path / "media")
    assert info.format == "vmdk"
    check_files(info, {v: dict(f) for v, f in appliance.disks[0].files.items()})
    engine.unmount(info.id)


def test_a_fault_at_every_step_of_a_two_disk_mount_leaves_nothing(engine: Engine, appliance: Appliance,
                                                                   tmp_path: Path) -> None:
    """Injected faults (IMGMOUNT_FAULT_AT=N: a failure we cannot cause at each exact step): rollback
    takes down what the first disk's layers made when the second disk's fail, and the reverse."""
    media, before = tmp_path / "media", leftovers.snapshot()
    for step in range(1, 100):
        faulty = Engine(engine.journal, settings=Settings(fault_at=step))
        try:
            info = mount(faulty, appliance.ova, media)
        except InjectedFault:
            assert mine(before, tmp_path) == [], f"leftovers after a fault at step {step}"
            assert engine.mounts() == [] and list(engine.journal.mounts.glob("*")) == []
            continue
        assert step > 20, "the attach of two disks has fewer fault points than layers"
        engine.unmount(info.id)
        break
    assert mine(before, tmp_path) == []


def crafted(appliance: Appliance, tmp_path: Path, disk: bytes, *, compression: str = "") -> Path:
    """The appliance's descriptor, with ``disk`` as its only disk (``compression`` in its References)."""
    work = tmp_path / "crafted"
    work.mkdir()
    subprocess.run(["tar", "-xf", str(appliance.ova), "-C", str(work), "appliance.ovf"], check=True)
    ovf = (work / "appliance.ovf").read_text()
    ovf = ovf.replace(f' ovf:href="{vmdk_name("appliance", 1)}"',
                      f' ovf:href="{vmdk_name("appliance", 1)}"{compression}')
    (work / "appliance.ovf").write_text(ovf.replace('<Disk ovf:capacity="67108864" ovf:diskId="vmdisk2" '
                                                    'ovf:fileRef="file2"', '<Unused'))
    (work / vmdk_name("appliance", 1)).write_bytes(disk)
    subprocess.run(["tar", "--format=ustar", "-cf", str(tmp_path / "crafted.ova"), "-C", str(work),
                    "appliance.ovf", vmdk_name("appliance", 1)], check=True)
    return tmp_path / "crafted.ova"


def test_a_disk_that_names_another_file_is_refused_before_qemu_opens_it(engine: Engine, appliance: Appliance,
                                                                       tmp_path: Path) -> None:
    flat = b'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n' \
        b'RW 2048 FLAT "/etc/shadow" 0\n'
    ova = crafted(appliance, tmp_path, flat)
    with pytest.raises(InvalidImageError, match=r"disk disk1 \(appliance-disk001.vmdk\) of .* names other files"):
        inspect_image(str(ova))
    with pytest.raises(InvalidImageError, match="an OVA's disks must be whole inside it"):
        mount(engine, ova, tmp_path / "media")
    assert engine.mounts() == []


def test_truncated_and_compressed_ovas_say_why(engine: Engine, appliance: Appliance, tmp_path: Path) -> None:
    data = appliance.ova.read_bytes()
    cut = tmp_path / "cut.ova"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(InvalidImageError, match=r"claims \d+ bytes, past the end of the file \(truncated"):
        mount(engine, cut, tmp_path / "media")
    compressed = crafted(appliance, tmp_path, b"\x1f\x8b" + bytes(1000), compression=' ovf:compression="gzip"')
    with pytest.raises(UnsupportedError, match="gzip-compressed, and imgmount reads disks in place only"):
        mount(engine, compressed, tmp_path / "media")
    assert engine.mounts() == []


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_split_and_flat_vmdks_keep_working(engine: Engine, appliance: Appliance, tmp_path: Path,
                                           subformat: str) -> None:
    """A descriptor with extent files beside it: QEMU finds them by name, relative to the descriptor."""
    mbr = appliance.disks[0]
    image = images.convert(mbr.raw, tmp_path / "split.vmdk", "vmdk", f"subformat={subformat}")
    assert len(list(tmp_path.glob("split*.vmdk"))) >= 2  # the descriptor and its extent(s)
    info = mount(engine, image, tmp_path / "media")
    check_files(info, {v: dict(f) for v, f in mbr.files.items()})
    engine.unmount(info.id)


def test_an_ova_is_read_only_and_a_tar_without_ovf_is_no_ova(engine: Engine, appliance: Appliance,
                                                              tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="is an OVA, which imgmount mounts read-only"):
        mount(engine, appliance.ova, tmp_path / "media", read_only=False)
    assert engine.mounts() == []
    whole = appliance.disks[1].raw
    subprocess.run(["tar", "--format=ustar", "-cf", str(tmp_path / "plain.tar"), "-C", str(whole.parent),
                    whole.name], check=True)
    assert inspect_image(str(tmp_path / "plain.tar")).image.format == "raw"
    with pytest.raises(InvalidImageError, match=r"plain.tar is not an OVA \(a tar archive whose first file"):
        inspect_image(str(tmp_path / "plain.tar"), fmt="ova")
    assert [d.name for d in inspect_image(str(appliance.ova), fmt="ova").disks] == ["disk1", "disk2"]


def test_disks_in_other_formats(engine: Engine, appliance: Appliance, tmp_path: Path) -> None:
    """The OVF does not have to name VMDKs: a raw and a qcow2 disk, each probed in place and pinned."""
    mbr, whole = appliance.disks
    shutil.copyfile(whole.raw, tmp_path / "vm-disk1.img")
    images.convert(mbr.raw, tmp_path / "vm-disk2.qcow2", "qcow2")
    (tmp_path / "vm.ovf").write_text(ovf_descriptor("vm", ["vm-disk1.img", "vm-disk2.qcow2"],
                                                    [(1, 64 << 20), (2, 160 << 20)]))
    subprocess.run(["tar", "--format=ustar", "-cf", str(tmp_path / "vm.ova"), "-C", str(tmp_path), "vm.ovf",
                    "vm-disk1.img", "vm-disk2.qcow2"], check=True)
    ins = inspect_image(str(tmp_path / "vm.ova"))
    assert [(d.name, d.image.format) for d in ins.disks] == [("disk1", "raw"), ("disk2", "qcow2")]
    info = mount(engine, tmp_path / "vm.ova", tmp_path / "media")
    check_files(info, {"disk1": dict(whole.files["disk"]), **{f"disk2/{v}": dict(f) for v, f in mbr.files.items()}})
    engine.unmount(info.id)
