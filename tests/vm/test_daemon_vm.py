"""The nbd and LVM paths end to end through imgmountd, on a real kernel: a real private bus, the real daemon."""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.bus import Bus, world_dir
from imgmount_testkit.client import Client
from imgmount_testkit.daemon import serving, tmpfs
from imgmount_testkit.users import OtherUser, imgmount_group, servers_of
from mountd.service.dbusapi import MOUNT_IFACE
from tests.support import guests


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Bus, Client]]:
    """One bus and daemon for this module's tests (a start costs nearly a minute under emulation); each test
    ends with no mount left."""
    with tmpfs() as run, serving(run) as (bus, _, cl):
        yield bus, cl


@pytest.fixture
def c(served: tuple[Bus, Client]) -> Client:
    return served[1]


@pytest.fixture
def group() -> Iterator[int]:
    with imgmount_group() as gid:
        yield gid


def test_nbd_and_lvm_through_the_daemon(c: Client, gpt: guests.Guest, scratch: Path) -> None:
    guest = gpt
    image = images.convert(guest.raw, scratch / "gpt.qcow2", "qcow2")
    path = c.mount(image).value()
    props = c.props(path, MOUNT_IFACE)
    assert (props["Backend"], props["Format"], props["ReadOnly"], props["State"]) == ("nbd", "qcow2", True, "mounted")
    nbd = Path(props["Device"]).name
    assert (Path("/sys/block") / nbd / "pid").exists()
    volumes = {name: (device, fstype, mountpoint) for name, device, fstype, mountpoint in props["Volumes"]}
    assert set(volumes) == set(guest.fstypes)
    assert volumes["guestvg/root"][0].startswith("/dev/mapper/imgmount-")  # our own device-mapper table
    assert volumes["p1"][0] == f"/dev/{nbd}p1"  # the kernel's own partition node
    for name, (_, _, mountpoint) in volumes.items():
        guests.check_files(Path(mountpoint), guest.files[name])
    assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None
    assert not (Path("/sys/block") / nbd / "pid").exists()
    assert all(not Path(mp).exists() for _, _, mp in volumes.values())
    assert c.manager("ListMounts").value() == []




def test_a_callers_image_on_nbd_is_parsed_by_a_qemu_running_as_the_caller(
        served: tuple[Bus, Client], gpt: guests.Guest, group: int) -> None:
    """A group member's qcow2 on the nbd backend: her own qemu-storage-daemon (her uid, no capabilities,
    no_new_privs) parses it; root's qemu-nbd on /dev/nbdN is only an NBD client of it; the kernel's partition
    nodes and our device-mapper LV carry her files; unmount leaves no server."""
    bus, c = served
    account = pwd.getpwnam("daemon")
    shared = world_dir("imgmount-vm-")
    try:
        guest = gpt
        image = images.convert(guest.raw, shared / "gpt.qcow2", "qcow2")
        os.chown(image, account.pw_uid, account.pw_gid)
        image.chmod(0o600)
        user = OtherUser(bus, account.pw_uid, account.pw_gid, (group,))
        try:
            path = user.mount(image).value()
            props = c.props(path, MOUNT_IFACE)
            assert (props["Backend"], props["Owner"], props["Image"]) == ("nbd", account.pw_uid, str(image))
            (server,) = servers_of(account.pw_uid)
            assert (server["NoNewPrivs"], server["CapEff"]) == ("1", "0" * 16)
            nbd = Path(props["Device"]).name
            client_pid = (Path("/sys/block") / nbd / "pid").read_text().strip()
            argv = Path(f"/proc/{client_pid}/cmdline").read_bytes().decode().split("\0")
            assert any(a.startswith("driver=nbd,server.type=unix") for a in argv) and str(image) not in argv
            volumes = {name: mountpoint for name, _, _, mountpoint in props["Volumes"]}
            assert set(volumes) == set(guest.fstypes)
            for name, mountpoint in volumes.items():
                guests.check_files(Path(mountpoint), guest.files[name])
            assert user.unmount(path).value() is None
            assert servers_of(account.pw_uid) == []
            assert not (Path("/sys/block") / nbd / "pid").exists()
        finally:
            user.close()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
