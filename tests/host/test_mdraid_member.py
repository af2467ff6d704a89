"""md RAID on this host, which has no md driver: a RAID1 member is mounted by itself (degraded), through a loop
device at its superblock's data offset; a whole mirror in one image is mounted from its first member.

The superblocks are imgmount_testkit.mdraid's (``mdadm --create`` needs md); the first test checks with
``mdadm --examine`` that mdadm reads them as it reads its own.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.mdraid import Array, data_area, examine, superblock, write_member
from mountd.engine.engine import Engine
from mountd.engine.inspection import VolumeKind, inspect_image
from mountd.engine.journal import Journal
from mountd.engine.render import render_tree
from mountd.errors import InvalidImageError, UnsupportedError
from mountd.layers.layer import InjectedFault
from mountd.model import MountInfo, MountRequest
from mountd.settings import Settings
from tests.support import guests, leftovers, raid
from tests.support.engines import cleaned
from tests.support.guests import Guest

VERSIONS = ("1.2", "1.1", "1.0", "0.90")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with cleaned(Engine(Journal(str(tmp_path / "state")))) as eng:
        yield eng


def mount(engine: Engine, image: Path, root: Path, **kw: object) -> MountInfo:
    return engine.mount(MountRequest(image=str(image), mount_root=str(root), **kw))  # type: ignore[arg-type]


def mine(left: list[str], tmp_path: Path) -> list[str]:
    """What this test left (other developers' tests run at the same time on this machine)."""
    return [x for x in left if str(tmp_path) in x]


def check_and_unmount(engine: Engine, info: MountInfo, guest: Guest) -> None:
    assert {v.name: v.filesystem for v in info.volumes} == dict(guest.fstypes)
    for v in info.volumes:
        guests.check_files(Path(v.mountpoint), guest.files[v.name])
    engine.unmount(info.id)
    assert engine.mounts() == []
    for v in info.volumes:
        assert not os.path.exists(v.mountpoint)


@pytest.mark.parametrize("version", VERSIONS)
def test_mdadm_reads_the_test_superblocks_as_its_own(tmp_path: Path, version: str) -> None:
    guest = raid.mirror_guest(tmp_path / "pair.raw", version)
    offset, size = raid.members(guest.raw, 2)[1]
    shown = examine(guest.raw, offset, size)
    assert shown["Raid Level"] == "raid1" and shown["Checksum"].endswith("correct")
    if version == "0.90":
        assert shown["Version"] == "0.90.00" and shown["UUID"] == ":".join(["5a5a5a5a"] * 4)
    else:
        start = data_area(version, size)[0] // 512
        assert (shown["Version"], shown["Name"], shown["Device Role"]) == (version, "debian:data",
                                                                           "Active device 1")
        assert shown.get("Data Offset", "0 sectors") == f"{start} sectors"


@pytest.mark.parametrize("version", VERSIONS)
def test_a_single_member_mounts_degraded_from_its_data_area(engine: Engine, tmp_path: Path,
                                                            version: str) -> None:
    guest = raid.mirror_guest(tmp_path / "member.raw", version, roles=(1,))
    name = "5a5a5a5a" if version == "0.90" else "data"  # 0.90 arrays have no name: the uuid's start
    ins = inspect_image(str(guest.raw))
    p1, md = ins.volumes
    assert (p1.name, p1.filesystem, p1.note) == ("p1", "", f"member 2 of 2 of RAID1 array {name}")
    assert (md.name, md.kind, md.filesystem) == (f"md/{name}", VolumeKind.MD, "ext4")
    assert md.note == "degraded: member 1 of 2 is not in this image; read from p1"
    assert p1.offset is not None
    assert md.offset == p1.offset + data_area(version, p1.size)[0]
    files = {md.name: guest.files[raid.VOLUME]}
    check_and_unmount(engine, mount(engine, guest.raw, tmp_path / "media"),
                      Guest(guest.raw, files, {md.name: "ext4"}))


def test_a_whole_disk_member_with_its_superblock_at_the_end(engine: Engine, tmp_path: Path) -> None:
    guest = raid.whole_disk_member(tmp_path / "disk.raw")
    ins = inspect_image(str(guest.raw))
    assert (ins.volumes[0].name, ins.volumes[0].note) == ("disk", "member 2 of 2 of RAID1 array data")
    info = mount(engine, guest.raw, tmp_path / "media")
    assert os.path.basename(info.volumes[0].mountpoint) == "disk-md_data"
    check_and_unmount(engine, info, guest)


@pytest.mark.parametrize("backend", ["loop", "fuse"])
def test_a_mirror_in_one_image_mounts_from_its_first_member(engine: Engine, tmp_path: Path,
                                                            backend: str) -> None:
    """Without md the pair is not assembled: its first member's data area is the array (a mirror holds
    the same bytes on each; which one came first does not matter for a read-only mount)."""
    guest = raid.mirror_guest(tmp_path / "pair.raw")
    image = guest.raw if backend == "loop" else images.convert(guest.raw, tmp_path / "pair.qcow2", "qcow2")
    ins = inspect_image(str(image))
    assert [(v.name, v.note) for v in ins.volumes] == [
        ("p1", "member 1 of 2 of RAID1 array data"), ("p2", "member 2 of 2 of RAID1 array data"),
        (raid.VOLUME, "")]
    first = ins.volumes[0].offset
    assert first is not None
    assert ins.volumes[2].offset == first + data_area("1.2", raid.PART)[0]
    check_and_unmount(engine, mount(engine, image, tmp_path / "media", backend=backend), guest)


def test_lvm_inside_the_mirror_follows(engine: Engine, tmp_path: Path) -> None:
    guest = raid.lvm_mirror_guest(tmp_path / "lvm.raw")
    ins = inspect_image(str(guest.raw))
    md = ins.layout.volume(raid.VOLUME)
    assert md is not None and md.pv and md.vg == "raidvg"
    assert md.note == "degraded: member 2 of 2 is not in this image; read from p1; LVM physical volume of raidvg"
    rows = [line.split() for line in render_tree(ins).splitlines()]
    assert ["└─md/data", "2", "MiB", "47", "MiB", "RAID1", "array", "LVM2_member"] in [r[:8] for r in rows]
    assert any(r[:1] == ["└─raidvg/root"] for r in rows)
    check_and_unmount(engine, mount(engine, guest.raw, tmp_path / "media"), guest)


def test_a_member_named_by_itself_points_at_the_array(engine: Engine, tmp_path: Path) -> None:
    guest = raid.mirror_guest(tmp_path / "member.raw", roles=(0,))
    with pytest.raises(UnsupportedError, match=r"member of an md RAID array: mount the array's volume \(md/"):
        mount(engine, guest.raw, tmp_path / "media", volumes=("p1",))
    assert engine.mounts() == []


def test_a_striped_array_missing_members_says_what_is_missing(engine: Engine, tmp_path: Path) -> None:
    raw = images.blank(tmp_path / "raid5.raw", 2 * raid.PART + 4 * images.MiB)
    for role, (offset, size) in enumerate(raid.members(raw, 2)):
        write_member(raw, offset, size, "1.2", Array("debian:big", level=5, raid_disks=3), role)
    (md,) = [v for v in inspect_image(str(raw)).volumes if v.kind == VolumeKind.MD]
    assert md.name == "md/big" and md.offset is None
    with pytest.raises(UnsupportedError, match=r"^volume md/big cannot be mounted: RAID5 array big is "
                                               r"incomplete: member 3 of 3 is not in this image$"):
        mount(engine, raw, tmp_path / "media", volumes=("md/big",))
    with pytest.raises(UnsupportedError, match="no mountable filesystem"):
        mount(engine, raw, tmp_path / "media")


def test_a_complete_striped_array_names_the_md_driver_this_host_lacks(engine: Engine, tmp_path: Path) -> None:
    """Every member of a RAID5 is here, but no member's data area is the array: it takes md to assemble it
    (the VM lane assembles it), and this kernel has none."""
    raw = images.blank(tmp_path / "raid5.raw", 3 * raid.PART + 4 * images.MiB)
    for role, (offset, size) in enumerate(raid.members(raw, 3)):
        write_member(raw, offset, size, "1.2", Array("debian:big", level=5, raid_disks=3), role)
    with pytest.raises(UnsupportedError, match=r"^volume md/big cannot be mounted: RAID5 array big is spread "
                                               r"over 3 members: it needs the kernel's md driver to assemble it$"):
        mount(engine, raw, tmp_path / "media", volumes=("md/big",))
    assert engine.mounts() == []


def test_a_raid5_s_filesystem_is_seen_through_its_members_without_md(engine: Engine, tmp_path: Path) -> None:
    """Inspection reads a complete RAID5's data from its members (md's chunk placement: the VM lane checks it
    against md's own arrays), so --info shows the ext4 inside on a host with no md; mounting it takes md."""
    raw = images.blank(tmp_path / "raid5.raw", 3 * raid.PART + 4 * images.MiB)
    places = raid.members(raw, 3)
    array = Array("debian:big", level=5, raid_disks=3)
    for role, (offset, size) in enumerate(places):
        write_member(raw, offset, size, "1.2", array, role)
    start, length = data_area("1.2", raid.PART)
    files = {"hello.txt": b"hello from a RAID5\n"}
    plain = images.blank(tmp_path / "plain.raw", 2 * length)
    images.format_region(plain, 0, 2 * length, "ext4", label="big", files=files)
    _scatter_left_asymmetric(plain, raw, [offset + start for offset, _ in places])
    (md,) = [v for v in inspect_image(str(raw)).volumes if v.kind == VolumeKind.MD]
    assert (md.name, md.offset, md.filesystem, md.signature and md.signature.label) == ("md/big", None, "ext4", "big")
    with pytest.raises(UnsupportedError, match=r"^volume md/big cannot be mounted: RAID5 array big is spread "
                                               r"over 3 members: it needs the kernel's md driver to assemble it$"):
        mount(engine, raw, tmp_path / "media", volumes=("md/big",))


def _scatter_left_asymmetric(plain: Path, raw: Path, areas: list[int], chunk: int = 64 * 1024) -> None:
    """RAID5 layout 0 of 3 members (what the test kit's superblocks say), written out by hand: stripe s has
    its parity on member 2 - s % 3 and its two data chunks on the others, in member order."""
    data = plain.read_bytes()
    with open(raw, "r+b") as out:
        for c in range(len(data) // chunk):
            stripe, index = divmod(c, 2)
            parity = 2 - stripe % 3
            member = index if index < parity else index + 1
            out.seek(areas[member] + stripe * chunk)
            out.write(data[c * chunk:(c + 1) * chunk])


def test_a_crafted_superblock_is_one_sentence_and_nothing_is_left(engine: Engine, tmp_path: Path) -> None:
    guest = raid.mirror_guest(tmp_path / "crafted.raw", roles=(0,))
    offset, size = raid.members(guest.raw, 1)[0]
    where, block = superblock("1.2", size, raid.ARRAY, 0)
    struct.pack_into("<Q", block, 136, 2**62)  # data_size, checksum left stale
    with open(guest.raw, "r+b") as f:
        f.seek(offset + where)
        f.write(block)
    before = leftovers.snapshot()
    with pytest.raises(InvalidImageError, match=r"^partition p1: the md superblock \(version 1.2\) has a bad "
                                                r"checksum: it is damaged$"):
        mount(engine, guest.raw, tmp_path / "media")
    assert mine(leftovers.snapshot().new_since(before), tmp_path) == [] and engine.mounts() == []


@pytest.mark.parametrize("step", range(1, 7))
def test_a_fault_at_each_step_of_a_member_mount_leaves_nothing(tmp_path: Path, step: int) -> None:
    """Steps: whole-disk loop (before, after), the data area's loop (before, after), the mount."""
    guest = raid.mirror_guest(tmp_path / "member.raw", roles=(1,))
    engine = Engine(settings=Settings(state_dir=tmp_path / "state", fault_at=step))
    before = leftovers.snapshot()
    with pytest.raises(InjectedFault, match=f"step {step}"):
        mount(engine, guest.raw, tmp_path / "media")
    assert mine(leftovers.snapshot().new_since(before), tmp_path) == [] and engine.mounts() == []
