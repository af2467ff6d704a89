"""Issue 9's crafted inputs sent through imgmountd by a user who is not root (group imgmount): LVM metadata
past each bound of our readers, and a qcow2 of 20 TiB with a filesystem beyond 16 TiB. Each is read by the
daemon's own parsers and by her own QEMU, answered with one sentence of the right class (or mounted), and
the daemon keeps serving; nothing is left."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from imgmount_testkit.client import Client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.lvm_synth import crafted_vg, pv_file
from imgmount_testkit.users import OtherUser
from mountd.image.lvmconfig import MAX_LVS
from mountd.service.dbusapi import MOUNT_IFACE
from tests.host.test_large_image import FILES, far
from tests.host.test_lvm_bounds import PAST_A_BOUND, PAST_A_BOUND_IDS
from tests.support import guests, leftovers
from tests.support.daemon_calls import error

__all__ = ["far"]  # a fixture of test_large_image's, used here too


@pytest.fixture
def her(other: Callable[..., OtherUser], users: dict[str, tuple[int, int]], group: int) -> OtherUser:
    uid, gid = users["daemon"]
    return other(uid, gid, groups=(group,))


def hers(path: Path, users: dict[str, tuple[int, int]]) -> Path:
    os.chown(path, *users["daemon"])
    return path


@pytest.mark.parametrize(("text", "said"), PAST_A_BOUND, ids=PAST_A_BOUND_IDS)
def test_her_crafted_lvm_metadata_is_one_sentence(c: Client, daemon: Daemon, her: OtherUser, shared: Path,
                                                  users: dict[str, tuple[int, int]], text: Callable[[], bytes],
                                                  said: str) -> None:
    image = hers(pv_file(shared / "crafted.img", text()), users)
    try:
        assert said in error(her.inspect(image), "InvalidImage")
        assert said in error(her.mount(image), "InvalidImage")
        assert c.manager("ListMounts").value() == []  # nothing half-made, and the daemon serves on
    finally:
        image.unlink()


def test_her_vg_of_the_most_lvs_is_inspected_whole(daemon: Daemon, her: OtherUser, shared: Path,
                                                  users: dict[str, tuple[int, int]]) -> None:
    image = hers(pv_file(shared / "most-lvs.img", crafted_vg(lvs=MAX_LVS)), users)
    try:
        (vg,) = her.inspect(image).value()["volume-groups"]
        thin = [f"thin{i}" for i in range(MAX_LVS - 5)]
        assert vg["logical-volumes"] == ["lv0", "lv1", "pool", *thin]  # and the pool's 2 hidden LVs
    finally:
        image.unlink()


def test_her_20_tib_qcow2_mounts_beyond_16_tib(c: Client, daemon: Daemon, her: OtherUser, far: Path,
                                               shared: Path, users: dict[str, tuple[int, int]]) -> None:
    image = shared / "far.qcow2"
    subprocess.run(["cp", "--sparse=always", str(far), str(image)], check=True)
    hers(image, users)
    before = leftovers.snapshot()
    path = her.mount(image, volumes=("as", ["p2"])).value()
    (volume,) = c.prop(path, MOUNT_IFACE, "Volumes")
    guests.check_files(Path(volume[3]), FILES["p2"])
    her.unmount(path).value()
    assert leftovers.ours(leftovers.snapshot().new_since(before), image, daemon.state) == []
