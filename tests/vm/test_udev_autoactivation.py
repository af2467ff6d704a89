"""Host auto-activation of a guest VG, with a real udevd and Debian's own LVM udev rules (69-lvm.rules).

Control first: a plain ``qemu-nbd -c`` of the guest image gets its VG activated by the host, as on any Debian
desktop. Then the same image mounted by imgmount: systemd/60-imgmount.rules keeps LVM away from the devices
the engine claimed, so only our own device-mapper tables exist and unmounting leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.engine import Engine, MountRequest
from mountd.journal import Journal
from tests.support import guests, images
from tests.support.nbd import Uevents

RULE = Path(__file__).resolve().parents[2] / "systemd" / "60-imgmount.rules"
HOST_ACTIVATED = Path("/dev/mapper/guestvg-root")
LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def settle() -> None:
    """Wait until udevd has handled every queued event (bounded)."""
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def udevd() -> Iterator[None]:
    """The lane's udevd (virtme-ng starts one), with our rule installed as scripts/install would."""
    assert subprocess.run(["udevadm", "control", "--ping"], capture_output=True, check=False).returncode == 0, \
        "no udevd runs in the VM lane"
    rules = Path("/run/udev/rules.d")
    rules.mkdir(parents=True, exist_ok=True)
    shutil.copy(RULE, rules / RULE.name)
    subprocess.run(["udevadm", "control", "--reload"], check=True, capture_output=True)
    try:
        yield
    finally:
        (rules / RULE.name).unlink()
        subprocess.run(["udevadm", "control", "--reload"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def guest_qcow2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, guests.Guest]:
    guest = guests.gpt_guest(tmp_path_factory.mktemp("udev") / "gpt.raw")
    return images.convert(guest.raw, guest.raw.with_suffix(".qcow2"), "qcow2"), guest


def test_control_a_plain_qemu_nbd_attach_is_auto_activated(udevd: None, guest_qcow2: tuple[Path, guests.Guest],
                                                            free_nbd: str) -> None:
    image, _ = guest_qcow2
    events = Uevents()  # listening before the attach, so no event is missed
    subprocess.run(["qemu-nbd", "--fork", "-r", "-f", "qcow2", "-c", free_nbd, str(image)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = Path(free_nbd).name
    assert events.wait_until(lambda: Path(f"/sys/block/{name}/{name}p4").exists(), 60), "no partitions appeared"
    try:
        settle()
        assert HOST_ACTIVATED.exists(), "Debian's LVM rules did not auto-activate the guest VG: no control"
    finally:
        subprocess.run(["vgchange", "-an", "guestvg"], env=LVM_ENV, check=False, capture_output=True)
        subprocess.run(["qemu-nbd", "-d", free_nbd], check=True, capture_output=True)
        settle()
        subprocess.run(["vgchange", "-an", "guestvg"], env=LVM_ENV, check=False, capture_output=True)


def test_imgmount_devices_are_left_alone(udevd: None, guest_qcow2: tuple[Path, guests.Guest],
                                         tmp_path: Path) -> None:
    image, guest = guest_qcow2
    engine = Engine(Journal())  # the default /run/imgmount: where the udev rule looks for claims
    info = engine.mount(MountRequest(str(image), mount_root=str(tmp_path / "media")))
    try:
        settle()
        assert not HOST_ACTIVATED.exists(), "the host auto-activated the guest VG of an imgmount device"
        root = next(v for v in info.volumes if v.name == "guestvg/root")
        guests.check_files(Path(root.mountpoint), guest.files["guestvg/root"])
    finally:
        engine.unmount(info.id)
    settle()
    assert not HOST_ACTIVATED.exists()
    assert list(Path("/run/imgmount/claimed").iterdir()) == []
