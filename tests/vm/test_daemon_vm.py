"""The nbd and LVM paths end to end through imgmountd, on a real kernel: a real private bus, the real daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.dbusapi import MOUNT_IFACE
from tests.support import guests, images
from tests.support.bus import Client, Daemon, client, private_bus, tmpfs


@pytest.fixture
def c(scratch: Path) -> Iterator[Client]:
    with private_bus() as bus, tmpfs() as run:
        daemon = Daemon(bus, run).start()
        try:
            with client(bus.address) as cl:
                yield cl
        finally:
            daemon.close()


def test_nbd_and_lvm_through_the_daemon(c: Client, scratch: Path) -> None:
    guest = guests.gpt_guest(scratch / "gpt.raw")
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


