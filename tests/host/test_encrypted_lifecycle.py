"""Encrypted mounts over their life: a fault injected at every step of the attach (IMGMOUNT_FAULT_AT: a
failure we cannot cause for real at each exact step) leaves nothing; keys are tried in order (the one named
for a volume, then the one for everywhere); a daemon killed and restarted adopts, verifies and unmounts an
encrypted mount without the secret, which its journal never held."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from imgmount_testkit.bus import Bus
from imgmount_testkit.client import client
from imgmount_testkit.daemon import Daemon
from mountd.engine.engine import Engine
from mountd.errors import UnsupportedError
from mountd.keys import Keys
from mountd.layers.layer import InjectedFault
from mountd.model import MountInfo, MountRequest
from mountd.service.dbusapi import MOUNT_IFACE
from mountd.settings import Settings
from tests.support import crypt_guests, guests, leftovers
from tests.support.crypt_guests import IMAGE_PASSPHRASE, PASSPHRASE
from tests.support.daemon_calls import killed_and_restarted, mountpoint, v
from tests.support.engines import engine_in
from tests.support.guests import Guest
from tests.support.secret_scan import files_holding


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with engine_in(tmp_path / "state") as eng:
        yield eng


def _mount(engine: Engine, guest: Guest, root: Path, keys: Keys, **kw: object) -> MountInfo:
    return engine.mount(MountRequest(image=str(guest.raw), mount_root=str(root), keys=keys,
                                     **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(("which", "backend", "layers"), [("luks1", "loop", 6), ("qcow2", "fuse", 3)])
def test_a_fault_at_every_step_leaves_nothing_behind(engine: Engine, luks1_disk: Guest, luks_qcow2: Guest,
                                                     tmp_path: Path, which: str, backend: str,
                                                     layers: int) -> None:
    """luks1: disk loop, p1 loop and mount, p2's luks export, its loop, its mount; qcow2: export, loop,
    mount. Each step fails once, before or after its layer."""
    guest, keys = (luks1_disk, Keys({"p2": PASSPHRASE})) if which == "luks1" else \
        (luks_qcow2, Keys({"image": IMAGE_PASSPHRASE}))
    media, before = tmp_path / "media", leftovers.snapshot()
    for step in range(1, 100):
        try:
            info = _mount(Engine(engine.journal, settings=Settings(fault_at=step)), guest, media, keys,
                          backend=backend)
        except InjectedFault as exc:
            assert f"step {step}" in str(exc)
            left = leftovers.ours(leftovers.snapshot().new_since(before), guest.raw, engine.journal.root, media)
            assert left == [], f"leftovers after a fault at step {step}"
            assert engine.mounts() == [] and list(engine.journal.mounts.glob("*")) == []
            assert list((engine.journal.root / "exports").glob("*")) == []
            continue
        assert step == 2 * layers + 1, "a fault point before and after each layer"
        for vol in info.volumes:
            guests.check_files(Path(vol.mountpoint), guest.files[vol.name])
        engine.unmount(info.id)
        break
    else:
        pytest.fail("the mount never succeeded")


def test_keys_are_tried_in_order(engine: Engine, luks1_disk: Guest, tmp_path: Path) -> None:
    before = leftovers.snapshot()
    info = _mount(engine, luks1_disk, tmp_path / "media", Keys({"p2": b"a wrong one"}, everywhere=PASSPHRASE),
                  volumes=("p2",))
    guests.check_files(Path(info.volumes[0].mountpoint), luks1_disk.files["p2"])
    engine.unmount(info.id)
    assert leftovers.ours(leftovers.snapshot().new_since(before), luks1_disk.raw, engine.journal.root) == []


def test_lvm_inside_luks1(engine: Engine, tmp_path: Path) -> None:
    guest = crypt_guests.luks1_lvm_guest(tmp_path)
    info = _mount(engine, guest, tmp_path / "media", Keys(everywhere=PASSPHRASE))
    assert [(v.name, v.filesystem) for v in info.volumes] == [("cryptvg/root", "ext4")]
    guests.check_files(Path(info.volumes[0].mountpoint), guest.files["cryptvg/root"])
    engine.unmount(info.id)
    assert engine.mounts() == []


def test_luks2_without_device_mapper_names_it(engine: Engine, tmp_path: Path) -> None:
    from imgmount_testkit import crypt_images, images  # noqa: PLC0415

    disk = images.blank(tmp_path / "l2.raw", 40 * images.MiB)
    images.partition(disk, "label: gpt\nsize=30MiB\n")
    start = images.sfdisk_json(disk)["partitions"][0]["start"] * 512
    crypt_images.luks_format(disk, PASSPHRASE, version=2, offset=start, size=30 * images.MiB)
    request = MountRequest(image=str(disk), mount_root=str(tmp_path / "m"), keys=Keys(everywhere=b"x"))
    with pytest.raises(UnsupportedError, match="no mountable filesystem"):  # not among "every volume" here
        engine.mount(request)
    with pytest.raises(UnsupportedError, match="volume p1 is LUKS2: unlocking it needs device-mapper"):
        engine.mount(replace(request, volumes=("p1",)))
    assert engine.mounts() == []


def test_a_restarted_daemon_keeps_and_unmounts_an_encrypted_mount(bus: Bus, run: Path, luks1_disk: Guest,
                                                                  luks_qcow2: Guest) -> None:
    daemon = Daemon(bus, run).start()
    try:
        with client(bus.address) as c:
            rw = c.mount(luks1_disk.raw, passphrases=v("a{ss}", {"p2": PASSPHRASE.decode()}),
                         volumes=v("as", ["p2"]), **{"read-only": v("b", False)}).value()
            written = os.urandom(1 << 16)
            (mountpoint(c, rw) / "written.bin").write_bytes(written)
            os.sync()
            ro = c.mount(luks_qcow2.raw, passphrases=v("a{ss}", {"image": IMAGE_PASSPHRASE.decode()})).value()
        with killed_and_restarted(daemon) as (c, paths):
            assert sorted(paths) == sorted([rw, ro])
            assert (mountpoint(c, rw) / "written.bin").read_bytes() == written
            guests.check_files(mountpoint(c, ro), luks_qcow2.files["p1"])
            for path in paths:
                c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value()
        assert files_holding([PASSPHRASE, IMAGE_PASSPHRASE], [daemon.state, daemon.logfile]) == []
    finally:
        daemon.close()
