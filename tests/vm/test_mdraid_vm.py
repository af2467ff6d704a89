"""md RAID on a real kernel, with the lane's real udevd and Debian's mdadm rules (64-md-raid-assembly.rules):
images made by ``mdadm --create`` itself; a mirror whose members are all in the image is assembled read-only
with mdadm from our own devices and stopped at unmount; a single member is read degraded.

The host's incremental assembly is tested as test_udev_autoactivation.py tests LVM's: a plain ``qemu-nbd -c``
of the member image is assembled by the host (the control), an imgmount mount with systemd/60-imgmount.rules
installed is not, and without the rule the teardown stops the host's array instead of failing busy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.engine.inspection import VolumeKind, inspect_image
from mountd.engine.journal import Journal
from mountd.engine.render import inspection_to_dict
from mountd.host.mddev import array_state, md_devices, slaves, stop_host_arrays
from mountd.layers.layer import InjectedFault
from mountd.model import MountInfo, MountRequest
from mountd.settings import Settings
from tests.support import guests, nbd, raid
from tests.support.engines import cleaned
from tests.support.guests import Guest
from tests.support.hostlvm import settle
from tests.vm.test_udev_autoactivation import our_rule_installed


@pytest.fixture(scope="module")
def member(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    return raid.mdadm_guest(tmp_path_factory.mktemp("member") / "member.raw", "1.0", count=1)


@pytest.fixture
def engine() -> Iterator[Engine]:
    with cleaned(Engine(Journal())) as eng:  # the default /run/imgmount: where the udev rule looks for claims
        yield eng


def mount(engine: Engine, image: Path, root: Path, **kw: object) -> MountInfo:
    return engine.mount(MountRequest(image=str(image), mount_root=str(root), **kw))  # type: ignore[arg-type]


def arrays_on(device: str) -> list[str]:
    """The md arrays on ``device`` or its partitions."""
    name = Path(device).name
    return [md for md in md_devices() if any(s == name or s.startswith(f"{name}p") for s in slaves(md))]


def check_gone(engine: Engine, info: MountInfo) -> None:
    assert engine.mounts() == [] and arrays_on(info.device) == []
    assert not any(Path("/run/imgmount/claimed").iterdir())
    if info.backend == "nbd":
        assert nbd.is_free(Path(info.device).name)


def test_our_reading_of_mdadm_superblocks(pair: Guest, member: Guest) -> None:
    ins = inspect_image(str(pair.raw))
    p1, p2, md = ins.volumes
    assert [p1.note, p2.note] == ["member 1 of 2 of RAID1 array data", "member 2 of 2 of RAID1 array data"]
    shown = raid.examined(pair.raw, p1.offset or 0, p1.size)
    assert md.offset == (p1.offset or 0) + int(shown["Data Offset"].split()[0]) * 512
    assert (md.kind, md.filesystem, md.size) == (VolumeKind.MD, "ext4", int(shown["Array Size"].split()[0]) * 1024)
    single = inspect_image(str(member.raw)).volumes
    assert single[-1].note == "degraded: member 2 of 2 is not in this image; read from p1"


@pytest.mark.parametrize(("backend", "fmt"), [("nbd", "qcow2"), ("loop", "raw")])
def test_a_mirror_in_one_image_is_assembled_read_only(engine: Engine, pair: Guest, scratch: Path, udevd: None,
                                                      caplog: pytest.LogCaptureFixture, backend: str,
                                                      fmt: str) -> None:
    image = pair.raw if fmt == "raw" else images.convert(pair.raw, scratch / "pair.qcow2", fmt)
    with our_rule_installed():
        info = mount(engine, image, scratch / "media", backend=backend)
        settle()
        layers = engine.journal.read(info.id).layers
        (md,) = [Path(r.identity["node"]).name for r in layers if r.kind == "md"]
        ours = {Path(str(r.identity.get("node", ""))).name for r in layers}
        assert array_state(md) == "readonly" and len(slaves(md)) == 2 and slaves(md) <= ours
        assert [a for a in md_devices() if slaves(a) & ours] == [md], "another array sits on our devices"
        guests.check_files(Path(info.volumes[0].mountpoint), pair.files[raid.VOLUME])
        engine.unmount(info.id)
        assert md not in md_devices()
        check_gone(engine, info)
    assert "the host assembled" not in caplog.text, "the rule did not keep the host's assembly away"



@pytest.mark.parametrize(("level", "devices"), [(0, 2), (5, 3)])
def test_a_striped_array_in_one_image_is_assembled_read_only(engine: Engine, scratch: Path, udevd: None,
                                                             level: int, devices: int) -> None:
    """Not only mirrors: a RAID0 and a RAID5 that mdadm made, every member a partition of the image. Our
    inspection reads the filesystem in them from the members (mdstripes: md's chunk placement, checked here
    against md's own arrays); the mount assembles them from our devices and reads them byte for byte."""
    guest = raid.mdadm_guest(scratch / f"raid{level}.raw", count=devices, level=level, devices=devices)
    shown = inspection_to_dict(inspect_image(str(guest.raw), host=engine.host))["volumes"]
    (array,) = [v for v in shown if v["name"] == raid.VOLUME]  # read from its members as md places chunks
    assert (array["filesystem"]["type"], array["offset"]) == ("ext4", None)
    assert array["note"] == f"RAID{level} array data is spread over {devices} members: assembled read-only " \
        "with mdadm when mounted"
    with our_rule_installed():
        info = mount(engine, guest.raw, scratch / "media", backend="loop")
        layers = engine.journal.read(info.id).layers
        (md,) = [Path(r.identity["node"]).name for r in layers if r.kind == "md"]
        assert array_state(md) == "readonly" and len(slaves(md)) == devices
        assert Path(f"/sys/block/{md}/md/level").read_text().strip() == f"raid{level}"
        guests.check_files(Path(info.volumes[0].mountpoint), guest.files[raid.VOLUME])
        engine.unmount(info.id)
        assert md not in md_devices()
        check_gone(engine, info)


def test_lvm_inside_a_raid5_is_mapped_on_the_assembled_array(engine: Engine, scratch: Path, udevd: None) -> None:
    """The Debian installer's "RAID5, then LVM": inspection reads the PV and its VG through the members, and
    the mount assembles the array and maps the LV on it with our own table."""
    guest = raid.mdadm_guest(scratch / "raid5-lvm.raw", count=3, level=5, devices=3, lvm=True)
    root = inspect_image(str(guest.raw)).layout.volume("raidvg/root")
    assert root is not None and root.filesystem == "ext4" and root.unmapped == f"on md array {raid.VOLUME}"
    with our_rule_installed():
        info = mount(engine, guest.raw, scratch / "media", backend="loop")
        assert [v.name for v in info.volumes] == ["raidvg/root"]
        guests.check_files(Path(info.volumes[0].mountpoint), guest.files["raidvg/root"])
        engine.unmount(info.id)
        check_gone(engine, info)


def test_a_single_member_is_read_degraded(engine: Engine, member: Guest, scratch: Path, udevd: None) -> None:
    image = images.convert(member.raw, scratch / "member.qcow2", "qcow2")
    with our_rule_installed():
        info = mount(engine, image, scratch / "media", backend="nbd")
        kinds = {r.volume: r.kind for r in engine.journal.read(info.id).layers}
        assert kinds[raid.VOLUME] == "mount" and "md" not in kinds.values()
        guests.check_files(Path(info.volumes[0].mountpoint), member.files[raid.VOLUME])
        engine.unmount(info.id)
        check_gone(engine, info)


@contextlib.contextmanager
def plain_attach(image: Path) -> Iterator[str]:
    """``qemu-nbd -c`` as a person types it; the host's arrays on it stopped before it is detached."""
    device = f"/dev/{nbd.free_devices()[0]}"
    images.run(["qemu-nbd", "--fork", "-r", "-f", "qcow2", "-c", device, str(image)])
    try:
        yield device
    finally:
        settle()
        stop_host_arrays([device])
        images.run(["qemu-nbd", "-d", device])


def test_the_host_assembles_a_plain_attach_but_not_imgmount_s(engine: Engine, member: Guest, scratch: Path,
                                                             udevd: None) -> None:
    image = images.convert(member.raw, scratch / "member.qcow2", "qcow2")
    with plain_attach(image) as device:
        settle()
        assert arrays_on(device), "the control failed: the host did not assemble the member of a plain attach"

    with our_rule_installed():
        info = mount(engine, image, scratch / "media", backend="nbd")
        settle()
        assert arrays_on(info.device) == [], f"the host assembled an array on {info.device}"
        guests.check_files(Path(info.volumes[0].mountpoint), member.files[raid.VOLUME])
        engine.unmount(info.id)
        check_gone(engine, info)


def test_without_our_rule_the_host_array_is_stopped_at_unmount(engine: Engine, member: Guest, scratch: Path,
                                                                udevd: None) -> None:
    """From a checkout, without the rule: the host assembles the member on our nbd partition (the issue's
    md126), and the unmount stops it instead of failing "in use" and leaving the nbd device behind."""
    image = images.convert(member.raw, scratch / "member.qcow2", "qcow2")
    info = mount(engine, image, scratch / "media", backend="nbd")
    settle()
    assert arrays_on(info.device), "the host did not assemble the member: this proves nothing"
    guests.check_files(Path(info.volumes[0].mountpoint), member.files[raid.VOLUME])
    engine.unmount(info.id)
    check_gone(engine, info)


@pytest.mark.parametrize("step", [7, 8])  # loop backend: disk (1, 2), p1 (3, 4), p2 (5, 6), md (7, 8)
def test_a_fault_at_the_md_step_leaves_nothing(pair: Guest, scratch: Path, udevd: None, step: int) -> None:
    engine = Engine(Journal(), settings=Settings(fault_at=step))
    with our_rule_installed(), pytest.raises(InjectedFault, match=rf"step {step} \((before|after) md md/data\)"):
        mount(engine, pair.raw, scratch / "media", backend="loop")
    settle()
    assert engine.mounts() == [] and not [md for md in md_devices() if md.startswith("md2")]
    assert str(pair.raw) not in images.run(["losetup", "--list", "--noheadings", "-O", "BACK-FILE"])
