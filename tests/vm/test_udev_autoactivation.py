"""Host auto-activation of guest VGs, with the lane's real udevd and Debian's own LVM rules (69-lvm.rules).

Each test does the same thing twice from the same starting point (LVM's event-activation memory of the
guest VG cleared, as on a host that just booted): a plain attach as a person would type it, which the host
auto-activates (the control: without it "left alone" would prove nothing), and an imgmount mount of the
same image, which systemd/60-imgmount.rules keeps LVM away from, so only our own device-mapper tables exist
and unmounting leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.model import MountRequest
from tests.support import guests, nbd
from tests.support.hostlvm import host_state_forgotten, reload_rules, settle

RULE = Path(__file__).resolve().parents[2] / "systemd" / "60-imgmount.rules"
VG = "guestvg"
HOST_ACTIVATED = Path(f"/dev/mapper/{VG}-root")
LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


@contextlib.contextmanager
def our_rule_installed() -> Iterator[None]:
    """systemd/60-imgmount.rules in the running udevd, as scripts/install puts it on a host."""
    rules = Path("/run/udev/rules.d")
    rules.mkdir(parents=True, exist_ok=True)
    shutil.copy(RULE, rules / RULE.name)
    reload_rules()
    try:
        yield
    finally:
        (rules / RULE.name).unlink()
        reload_rules()


def control_nbd(gpt: guests.Guest, image: Path) -> Callable[[], object]:
    """``qemu-nbd -c`` as a person types it; returns the detach."""
    device = f"/dev/{nbd.free_devices()[0]}"
    images.run(["qemu-nbd", "--fork", "-r", "-f", "qcow2", "-c", device, str(image)])
    return lambda: images.run(["qemu-nbd", "-d", device])


def control_loop(gpt: guests.Guest, image: Path) -> Callable[[], object]:
    """``losetup -o`` at the PV's partition, the way the fuse and loop backends attach it; returns the detach."""
    pv = images.sfdisk_json(gpt.raw)["partitions"][3]
    device = images.run(["losetup", "--find", "--show", "--read-only", "-o", str(pv["start"] * 512),
                         "--sizelimit", str(pv["size"] * 512), str(gpt.raw)]).strip()
    return lambda: images.run(["losetup", "-d", device])


@pytest.mark.parametrize(("backend", "control"), [("nbd", control_nbd), ("fuse", control_loop)],
                         ids=["nbd", "fuse"])
def test_host_activates_a_plain_attach_but_leaves_imgmount_alone(
        udevd: None, gpt: guests.Guest, tmp_path: Path, backend: str,
        control: Callable[[guests.Guest, Path], Callable[[], object]]) -> None:
    image = images.convert(gpt.raw, tmp_path / "gpt.qcow2", "qcow2")

    with host_state_forgotten(VG):
        detach = control(gpt, image)
        try:
            settle()
            assert HOST_ACTIVATED.exists(), "the control failed: the host did not auto-activate a plain attach"
        finally:
            images.run(["vgchange", "-q", "-an", VG])
            detach()

    engine = Engine(Journal())  # the default /run/imgmount: where the udev rule looks for claims
    with our_rule_installed(), host_state_forgotten(VG):
        info = engine.mount(MountRequest(str(image), mount_root=str(tmp_path / "media"), backend=backend))
        try:
            settle()
            assert not HOST_ACTIVATED.exists(), f"the host auto-activated the guest VG on {info.device}"
            root = next(v for v in info.volumes if v.name == f"{VG}/root")
            guests.check_files(Path(root.mountpoint), gpt.files[f"{VG}/root"])
        finally:
            engine.unmount(info.id)
        settle()
        assert not HOST_ACTIVATED.exists()
        assert list(Path("/run/imgmount/claimed").iterdir()) == []


def test_without_our_rule_the_host_activation_is_removed_at_unmount(udevd: None, gpt: guests.Guest,
                                                                     tmp_path: Path) -> None:
    """Running from a checkout, or with a distribution's rules that ignore the flag: the host activates the
    guest VG on our nbd partition, and the unmount removes that activation instead of failing busy."""
    image = images.convert(gpt.raw, tmp_path / "gpt.qcow2", "qcow2")
    engine = Engine(Journal())
    with host_state_forgotten(VG):
        info = engine.mount(MountRequest(str(image), mount_root=str(tmp_path / "media"), backend="nbd"))
        settle()
        assert HOST_ACTIVATED.exists(), "the host did not auto-activate the guest VG: this proves nothing"
        engine.unmount(info.id)
        assert not HOST_ACTIVATED.exists()
        assert nbd.is_free(Path(info.device).name)
        assert engine.mounts() == []
