"""Mounting and unmounting while the lane's real udevd processes events of our devices, as it does on a busy
host: each event makes a udev worker open the device (to take its lock and probe it), and device-mapper,
dm-crypt and md refuse to let go of a device anyone has open. An event that starts just as ``dmsetup remove``
or ``mdadm --stop`` runs must not fail the unmount (it did: the thin pool's rollback in the VM lane under load,
and an md array's unmount); a real user still does. A writer's close makes udevd re-read a disk's partition
table, and the mount on its partitions must go through.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.errors import BusyError
from mountd.model import MountInfo, MountRequest
from tests.support import guests, raid
from tests.support.background import repeated
from tests.support.engines import cleaned
from tests.support.guests import Guest
from tests.support.thin_guest import VG
from tests.vm.test_udev_autoactivation import our_rule_installed

ROUNDS = 2


@pytest.fixture
def engine() -> Iterator[Engine]:
    with cleaned(Engine(Journal())) as eng:  # the default /run/imgmount: where the udev rule looks for claims
        yield eng


@contextmanager
def udev_events(kind: str) -> Iterator[list[int]]:
    """``udevadm trigger --action=change`` on every ``kind`` device (dm, md) back to back until the block
    ends; yields the count of triggers sent, for the test to check that the storm overlapped its work."""
    trigger = ["udevadm", "trigger", "--action=change", "--subsystem-match=block", f"--sysname-match={kind}*"]
    with repeated(lambda: subprocess.run(trigger, check=False, capture_output=True)) as sent:
        yield sent


@contextmanager
def closes_after_write() -> Iterator[list[int]]:
    """Every connected nbd device opened for writing and closed, back to back: udevd watches nbd devices
    (60-block.rules), and on each such close it re-reads the disk's partition table if it can take the disk's
    lock; every partition node goes and comes back. Yields the count of rounds, as :func:`udev_events`."""
    script = 'for p in /sys/block/nbd*/pid; do [ -e "$p" ] || continue; d=${p%/pid}; : 1<>"/dev/${d##*/}"; done'
    with repeated(lambda: subprocess.run(["sh", "-c", script], check=False, capture_output=True)) as sent:
        yield sent


def unmount_during_events(engine: Engine, info: MountInfo, kind: str) -> None:
    with udev_events(kind) as sent:
        engine.unmount(info.id)
        during = sent[0]
    assert during > 0, "no udev event was sent while the unmount ran"
    assert engine.mounts() == []
    assert not [line for line in images.run(["dmsetup", "ls"]).splitlines() if f"imgmount-{info.id}" in line]


@pytest.mark.usefixtures("udevd")
def test_thin_lvs_map_and_unmount_while_udev_works_on_them(engine: Engine, thin: Guest, scratch: Path) -> None:
    """A thin LV: four device-mapper devices (the pool's metadata and data, the pool, the LV) mapped on a
    partition whose table udevd re-reads again and again (test_nbd_layer times udevd's steps to the moment
    that broke CI), then removed while udev probes them."""
    image = images.convert(thin.raw, scratch / "fedora.qcow2", "qcow2")
    with our_rule_installed():
        for _ in range(ROUNDS):
            with closes_after_write() as sent:
                info = engine.mount(MountRequest(image=str(image), mount_root=str(scratch / "media"),
                                                 backend="nbd", volumes=(f"{VG}/root",)))
                during = sent[0]
            assert during > 0, "no writer closed the device while the mount ran"
            guests.check_files(Path(info.volumes[0].mountpoint), thin.files[f"{VG}/root"])
            unmount_during_events(engine, info, "dm-")


@pytest.mark.usefixtures("udevd")
def test_an_md_array_stops_while_udev_probes_it(engine: Engine, pair: Guest, scratch: Path) -> None:
    with our_rule_installed():
        for _ in range(ROUNDS):
            info = engine.mount(MountRequest(image=str(pair.raw), mount_root=str(scratch / "media"),
                                             backend="loop"))
            guests.check_files(Path(info.volumes[0].mountpoint), pair.files[raid.VOLUME])
            unmount_during_events(engine, info, "md")


@pytest.mark.usefixtures("udevd")
def test_a_real_user_still_keeps_the_lv_and_is_named(engine: Engine, thin: Guest, scratch: Path) -> None:
    """The control: udev is waited for, a program that holds the LV open is not."""
    image = images.convert(thin.raw, scratch / "fedora.qcow2", "qcow2")
    with our_rule_installed():
        info = engine.mount(MountRequest(image=str(image), mount_root=str(scratch / "media"), backend="nbd",
                                         volumes=(f"{VG}/root",)))
        with open(info.volumes[0].device, "rb") as lv:
            holder = subprocess.Popen(["sleep", "600"], stdin=lv)
        try:
            with udev_events("dm-"), pytest.raises(BusyError, match=rf"sleep \(pid {holder.pid}\) has"):
                engine.unmount(info.id)
        finally:
            holder.kill()
            holder.wait()
        engine.unmount(info.id)
        assert engine.mounts() == []
