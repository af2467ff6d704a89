"""An unlocked Ubuntu disk and the host's LVM auto-activation (Debian's 69-lvm.rules, the lane's real udevd):
the guest's PV appears the moment imgmount opens the LUKS2 volume.

Control: without systemd/60-imgmount.rules the host activates ``vgubuntu`` on our crypt device (the warning
says so) and imgmount removes that activation, which would otherwise keep the volume busy. With the rule
installed (it marks the imgmount-* device-mapper devices), the host leaves the unlocked volume alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.crypt_layouts import CryptGuest, ubuntu_encrypted
from mountd.engine.engine import Engine
from mountd.host.dmlist import dm_devices
from mountd.keys import Keys
from mountd.model import MountRequest
from tests.support import guests
from tests.support.engines import engine_in
from tests.support.hostlvm import settle
from tests.vm.test_udev_autoactivation import our_rule_installed

SECRET = b"passphrase of the udev test"
VG = "vgubuntu"
ACTIVATED = "the host auto-activated vgubuntu-root"


@pytest.fixture(scope="module")
def ubuntu(tmp_path_factory: pytest.TempPathFactory) -> CryptGuest:
    return ubuntu_encrypted(tmp_path_factory.mktemp("udev-crypt") / "ubuntu.raw", SECRET)


@pytest.fixture
def engine(scratch: Path) -> Iterator[Engine]:
    images.forget_vg_online(VG)  # as on a host that just booted: LVM has not seen this VG yet
    with engine_in(scratch / "state") as eng:
        yield eng
    images.forget_vg_online(VG)


def host_lvs() -> list[str]:
    return [d.name for d in dm_devices() if d.uuid.startswith("LVM-") and d.name.startswith(f"{VG}-")]


def mount_and_unmount(engine: Engine, ubuntu: CryptGuest, root: Path) -> None:
    info = engine.mount(MountRequest(str(ubuntu.raw), mount_root=str(root), keys=Keys(everywhere=SECRET)))
    settle()
    mounted = next(v for v in info.volumes if v.name == f"{VG}/root")
    guests.check_files(Path(mounted.mountpoint), ubuntu.files[f"{VG}/root"])
    engine.unmount(info.id)
    assert host_lvs() == [] and engine.mounts() == []


@pytest.mark.usefixtures("udevd")
def test_without_our_rule_the_host_activation_is_removed(engine: Engine, ubuntu: CryptGuest, scratch: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    mount_and_unmount(engine, ubuntu, scratch / "media")
    assert ACTIVATED in caplog.text, "the control failed: the host did not auto-activate the unlocked volume"


@pytest.mark.usefixtures("udevd")
def test_with_our_rule_the_host_leaves_the_unlocked_volume_alone(
        engine: Engine, ubuntu: CryptGuest, scratch: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with our_rule_installed():
        mount_and_unmount(engine, ubuntu, scratch / "media")
    assert ACTIVATED not in caplog.text
