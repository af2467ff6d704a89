"""The host's own auto-activation of a guest's thin pool on imgmount's nbd partition, with the lane's real
udevd and Debian's 69-lvm.rules, and without systemd/60-imgmount.rules (a checkout without scripts/install).

LVM's activation stacks five dm devices on our partition: the pool's ``_tmeta`` and ``_tdata``, the
``-tpool`` over them, and the pool and each thin LV over that. The unmount must take them down top-down
(holders first) instead of failing busy on the partition. The control: a plain ``qemu-nbd -c`` of the same
image, which the host activates the same way (without it, "removed at unmount" would prove nothing).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.engine.lvmapping import LvMapper
from mountd.engine.stack import MountStack
from mountd.errors import BusyError
from mountd.host.dmlist import dm_devices
from mountd.image.blockio import FileReader
from mountd.image.lvmlabel import read_pv
from mountd.model import MountRequest
from tests.support import guests, nbd, thin_guest
from tests.support.guests import Guest
from tests.support.hostlvm import host_state_forgotten, settle
from tests.support.thin_guest import HOST_NAMES, VG


def test_the_host_activates_the_thin_pool_of_a_plain_attach(thin: Guest, tmp_path: Path) -> None:
    image = images.convert(thin.raw, tmp_path / "control.qcow2", "qcow2")
    device = f"/dev/{nbd.free_devices()[0]}"
    with host_state_forgotten(VG):
        images.run(["qemu-nbd", "--fork", "-r", "-f", "qcow2", "-c", device, str(image)])
        try:
            settle()
            assert thin_guest.host_activated() >= HOST_NAMES, images.run(["dmsetup", "ls"])
        finally:
            images.run(["vgchange", "-q", "-an", VG], env=images.LVM_ENV)
            images.run(["qemu-nbd", "-d", device])


@pytest.mark.parametrize("volumes", [("p1",), ()], ids=["thin-lvs-left-alone", "every-volume"])
def test_unmount_removes_the_hosts_thin_pool_holders_first(thin: Guest, tmp_path: Path,
                                                          volumes: tuple[str, ...]) -> None:
    """``p1`` only: the pool and thin LVs are the host's alone (the issue's case). Every volume: ours too,
    after the host's activation of the same pool is taken down (two pools on one metadata never coexist)."""
    image = images.convert(thin.raw, tmp_path / "fedora.qcow2", "qcow2")
    engine = Engine(Journal(str(tmp_path / "state")))
    with host_state_forgotten(VG):
        info = engine.mount(MountRequest(str(image), mount_root=str(tmp_path / "media"), backend="nbd",
                                         volumes=volumes))
        settle()
        for v in info.volumes:
            guests.check_files(Path(v.mountpoint), thin.files[v.name])
        if not volumes:
            assert {v.name for v in info.volumes} == set(thin.fstypes)
        else:
            assert thin_guest.host_activated() >= HOST_NAMES, "the host did not activate: proves nothing"
        engine.unmount(info.id)
        assert thin_guest.host_activated() == set()
        assert nbd.is_free(Path(info.device).name)
        assert f"imgmount-{info.id}" not in images.run(["dmsetup", "ls"])
        assert engine.mounts() == []


def test_no_second_pool_on_metadata_the_host_keeps_in_use(thin: Guest, tmp_path: Path) -> None:
    """The host's LVM activated the pool on our partition and a thin LV of it is mounted: mapping ours would
    put a second pool on the same metadata, so it is refused with the host's devices named; once they are
    closed, the unmount takes the host's activation down with ours."""
    image = images.convert(thin.raw, tmp_path / "busy.qcow2", "qcow2")
    engine = Engine(Journal(str(tmp_path / "state")))
    with host_state_forgotten(VG):
        info = engine.mount(MountRequest(str(image), mount_root=str(tmp_path / "media"), backend="nbd",
                                         volumes=("p1",)))
        settle()
        pv_node = f"{info.device}p2"
        fd = os.open(pv_node, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pv = read_pv(FileReader(fd))
        finally:
            os.close(fd)
        assert pv is not None and pv.vg is not None
        mapper = LvMapper(MountStack(engine.journal, engine.journal.read(info.id)), pv.vg, {pv.uuid: pv_node},
                          True, lambda volume: "")
        with images.mounted(f"/dev/mapper/{VG}-home", read_only=True):
            with pytest.raises(BusyError, match=f"{VG}-home.* is in use: imgmount maps no second thin pool"):
                mapper.node("home")
            assert not [d for d in dm_devices() if d.uuid.startswith(f"IMGMOUNT-{info.id}-")]
        engine.unmount(info.id)
        assert thin_guest.host_activated() == set()
        assert nbd.is_free(Path(info.device).name)
