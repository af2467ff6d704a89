"""The mount engine on a real kernel: the nbd backend, kernel partitions, device-mapper LVs."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.host.dmsetup import UDEV_SYNC
from mountd.model import MountInfo, MountRequest
from tests.support import guests, leftovers
from tests.support.guests import Guest

MiB = images.MiB
FORMATS = [("raw", ()), ("qcow2", ()), ("qcow", ()), ("vmdk", ()), ("vdi", ()), ("vhdx", ()),
           ("vpc", ("force_size=on",)), ("qed", ()), ("parallels", ())]
LVM_ENV = {**os.environ, "DM_DISABLE_UDEV": "1", "LVM_SUPPRESS_FD_WARNINGS": "1"}


def _mount(engine: Engine, image: Path, root: Path, **kw: object) -> MountInfo:
    return engine.mount(MountRequest(image=str(image), mount_root=str(root), **kw))  # type: ignore[arg-type]


def _kinds(engine: Engine, info: MountInfo) -> dict[str, str]:
    """volume name -> kind of the layer that exposes its block device."""
    return {r.volume: r.kind for r in engine.journal.read(info.id).layers if r.kind != "mount" and r.volume}


def _check(info: MountInfo, guest: Guest) -> None:
    assert {v.name: v.filesystem for v in info.volumes} == dict(guest.fstypes)
    for v in info.volumes:
        guests.check_files(Path(v.mountpoint), guest.files[v.name])


def _unmount_and_check_gone(engine: Engine, info: MountInfo) -> None:
    nbd = Path("/sys/block") / Path(info.device).name
    engine.unmount(info.id)
    assert not (nbd / "pid").exists() and int((nbd / "size").read_text()) == 0
    dm = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    assert f"imgmount-{info.id}" not in dm
    mounted = Path("/proc/self/mountinfo").read_text()
    assert all(f" {v.mountpoint} " not in mounted for v in info.volumes)


@pytest.fixture(scope="module")
def small_gpt(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    return guests.small_gpt_guest(tmp_path_factory.mktemp("small-gpt") / "small-gpt.raw")


@pytest.mark.parametrize(("fmt", "options"), FORMATS, ids=[f for f, _ in FORMATS])
def test_nbd_backend_every_format(engine: Engine, small_gpt: Guest, scratch: Path, fmt: str,
                                  options: tuple[str, ...]) -> None:
    """Each format through qemu-nbd, with a partition and an LV: what varies with the format (the other
    tests here mount ext4, xfs and btrfs side by side)."""
    image = images.convert(small_gpt.raw, scratch / f"gpt.{fmt}", fmt, *options)
    info = _mount(engine, image, scratch / "media", backend="nbd")
    assert (info.backend, info.format) == ("nbd", fmt) and info.device.startswith("/dev/nbd")
    _check(info, small_gpt)
    # max_part=16: the kernel's own partition nodes; the LV through our own device-mapper table
    assert _kinds(engine, info) == {"p1": "partition", "p2": "partition", "guestvg/root": "dm"}
    _unmount_and_check_gone(engine, info)


@pytest.mark.parametrize("udev", [True, False], ids=["udev-links", "libdevmapper-nodes"])
def test_an_lv_mounts_whoever_makes_its_node(engine: Engine, small_gpt: Guest, scratch: Path,
                                             monkeypatch: pytest.MonkeyPatch, udev: bool) -> None:
    """Where udevd runs (a host), dmsetup waits for it and /dev/mapper/NAME is udev's link to ../dm-N, which
    mount(8) shows as given (the mount refused it as a symlink until the VM lane ran as a host does); with
    DM_DISABLE_UDEV=1 (a container), libdevmapper makes the node itself. Either way it mounts, and the mount
    is found again in mountinfo."""
    monkeypatch.setattr(UDEV_SYNC, "allowed", udev)
    info = _mount(engine, small_gpt.raw, scratch / "media", backend="nbd")
    (lv,) = [v for v in info.volumes if v.name == "guestvg/root"]
    assert os.path.islink(lv.device) == udev and lv.device.startswith("/dev/mapper/imgmount-")
    _check(info, small_gpt)
    assert engine.verify(info.id) == []
    _unmount_and_check_gone(engine, info)
    assert not os.path.lexists(lv.device)


def test_nbd_read_write_round_trip(engine: Engine, gpt: Guest, scratch: Path) -> None:
    image = images.convert(gpt.raw, scratch / "rw.qcow2", "qcow2")
    data = os.urandom(64 * MiB)
    info = _mount(engine, image, scratch / "media", read_only=False, volumes=("p1", "guestvg/root"))
    for v in info.volumes:
        (Path(v.mountpoint) / "big.bin").write_bytes(data)
    _unmount_and_check_gone(engine, info)
    subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], check=True, capture_output=True)
    again = _mount(engine, image, scratch / "media", volumes=("p1", "guestvg/root"))
    for v in again.volumes:
        assert hashlib.sha256((Path(v.mountpoint) / "big.bin").read_bytes()).digest() == \
            hashlib.sha256(data).digest()
    _unmount_and_check_gone(engine, again)


def test_internal_snapshot_is_mounted_read_only(engine: Engine, gpt: Guest, scratch: Path) -> None:
    image = images.convert(gpt.raw, scratch / "snap.qcow2", "qcow2")
    images.run(["qemu-img", "snapshot", "-c", "before", str(image)])
    info = _mount(engine, image, scratch / "media", read_only=False, volumes=("p1",))
    (Path(info.volumes[0].mountpoint) / "after.txt").write_text("written after the snapshot")
    engine.unmount(info.id)
    snap = _mount(engine, image, scratch / "media", volumes=("p1",), snapshot="before")
    assert snap.read_only
    assert not (Path(snap.volumes[0].mountpoint) / "after.txt").exists()
    guests.check_files(Path(snap.volumes[0].mountpoint), gpt.files["p1"])
    _unmount_and_check_gone(engine, snap)


def test_same_vg_name_and_uuid_side_by_side(engine: Engine, gpt: Guest, scratch: Path) -> None:
    first = images.convert(gpt.raw, scratch / "one.qcow2", "qcow2")
    second = images.convert(gpt.raw, scratch / "two.qcow2", "qcow2")  # a clone: same VG name and UUID
    sums = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    a = _mount(engine, first, scratch / "media", volumes=("guestvg/root",))
    b = _mount(engine, second, scratch / "media", volumes=("guestvg/root",))
    for m in (a, b):
        guests.check_files(Path(m.volumes[0].mountpoint), gpt.files["guestvg/root"])
    assert a.volumes[0].device != b.volumes[0].device
    _unmount_and_check_gone(engine, a)
    _unmount_and_check_gone(engine, b)
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)] == sums  # nothing written


def test_guest_vg_named_like_an_active_host_vg(engine: Engine, gpt: Guest, scratch: Path) -> None:
    host_disk = images.blank(scratch / "host-pv.raw", 64 * MiB)
    images.make_lvm(host_disk, 0, 64 * MiB, "guestvg", [images.LvSpec("hostlv", 16)])
    with images.loop(host_disk) as dev:
        lvm = ["--devices", dev]
        subprocess.run(["vgchange", "-ay", *lvm, "guestvg"], check=True, capture_output=True, env=LVM_ENV)
        try:
            assert Path("/dev/mapper/guestvg-hostlv").exists()
            image = images.convert(gpt.raw, scratch / "guest.qcow2", "qcow2")
            info = _mount(engine, image, scratch / "media", volumes=("guestvg/root",))
            guests.check_files(Path(info.volumes[0].mountpoint), gpt.files["guestvg/root"])
            _unmount_and_check_gone(engine, info)
            assert Path("/dev/mapper/guestvg-hostlv").exists(), "the host's VG must be left alone"
        finally:
            subprocess.run(["vgchange", "-an", *lvm, "guestvg"], check=True, capture_output=True, env=LVM_ENV)


def test_sixteen_images_at_once(engine: Engine, scratch: Path) -> None:
    base = guests.whole_disk_guest(scratch / "small.raw")
    before = leftovers.snapshot()
    images_ = [images.convert(base.raw, scratch / f"small{i}.qcow2", "qcow2") for i in range(16)]
    infos = [_mount(engine, image, scratch / "media") for image in images_]
    assert len({m.device for m in infos}) == 16
    for m in infos:
        guests.check_files(Path(m.volumes[0].mountpoint), base.files["disk"])
    for m in infos:
        engine.unmount(m.id)
    assert engine.mounts() == []
    assert leftovers.snapshot().new_since(before) == []


def test_an_image_on_a_tmpfs_without_o_direct(engine: Engine, scratch: Path) -> None:
    """Debian 12's kernel (6.1) has no O_DIRECT on tmpfs (6.6 added it), and /dev/shm, /run/user and many a
    /tmp are tmpfs: an image there mounts all the same (inspection's qemu-nbd once asked for O_DIRECT, and
    every such image failed with "filesystem does not support O_DIRECT")."""
    probe = scratch / "probe"
    probe.write_bytes(b"x")
    with pytest.raises(OSError) as refused:  # the condition itself: the lane's scratch is such a tmpfs
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    assert refused.value.errno == errno.EINVAL
    guest = guests.whole_disk_guest(scratch / "shm.raw")
    info = _mount(engine, images.convert(guest.raw, scratch / "shm.qcow2", "qcow2"), scratch / "media")
    guests.check_files(Path(info.volumes[0].mountpoint), guest.files["disk"])
    _unmount_and_check_gone(engine, info)


def unload_nbd() -> None:
    """``rmmod nbd`` once udev has handled the events of the tests before: a udev worker probing an nbd
    device holds the module ("Module nbd is in use", seen once in CI). Bounded by udevadm's timeout."""
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=True)
    subprocess.run(["rmmod", "nbd"], check=True)


@pytest.fixture
def nbd_without_partitions() -> Iterator[None]:
    """Reload the nbd module with max_part=0 (as a host may have it), and restore max_part=16 after."""
    unload_nbd()
    subprocess.run(["modprobe", "nbd", "max_part=0", "nbds_max=32"], check=True)
    try:
        yield
    finally:
        unload_nbd()
        subprocess.run(["modprobe", "nbd", "max_part=16", "nbds_max=32"], check=True)


def test_max_part_0_uses_loop_devices_at_partition_offsets(nbd_without_partitions: None, engine: Engine,
                                                          gpt: Guest, scratch: Path) -> None:
    image = images.convert(gpt.raw, scratch / "mp0.qcow2", "qcow2")
    info = _mount(engine, image, scratch / "media")
    _check(info, gpt)
    kinds = _kinds(engine, info)
    assert [kinds[p] for p in ("p1", "p2", "p3", "p4")] == ["loop"] * 4 and kinds["guestvg/root"] == "dm"
    _unmount_and_check_gone(engine, info)
