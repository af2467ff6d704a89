"""Thin LVs (the Fedora/RHEL installer's layout, made by LVM's own tools) mounted on the nbd backend through
our own device-mapper tables: the pool's metadata and data LVs, a ``thin-pool`` device over them, a ``thin``
device per thin LV, each a layer; read-only (the pool ``read_only``: the image is not written) and
read-write (the data persists); two clones with the same VG and LV names side by side; a fault injected at
every step of the attach leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.layers.layer import InjectedFault
from mountd.model import MountInfo, MountRequest
from mountd.settings import Settings
from tests.support import guests, leftovers
from tests.support.guests import Guest
from tests.support.thin_guest import VG

#: volume of each dm layer of a mount of both thin LVs -> its target
TARGETS = {f"{VG}/pool00_tmeta": "linear", f"{VG}/pool00_tdata": "linear", f"{VG}/pool00": "thin-pool",
           f"{VG}/root": "thin", f"{VG}/home": "thin"}


def mount(engine: Engine, image: Path, root: Path, **kw: object) -> MountInfo:
    return engine.mount(MountRequest(image=str(image), mount_root=str(root), backend="nbd", **kw))  # type: ignore[arg-type]


def dm_targets(engine: Engine, info: MountInfo) -> dict[str, str]:
    return {r.volume: r.identity["table"][0][2] for r in engine.journal.read(info.id).layers if r.kind == "dm"}


def dm_table(name: str) -> list[str]:
    return images.run(["dmsetup", "table", name]).split()


def unmount_and_check_gone(engine: Engine, info: MountInfo) -> None:
    nbd = Path("/sys/block") / Path(info.device).name
    engine.unmount(info.id)
    assert not (nbd / "pid").exists() and int((nbd / "size").read_text()) == 0
    assert f"imgmount-{info.id}" not in images.run(["dmsetup", "ls"])
    mounted = Path("/proc/self/mountinfo").read_text()
    assert all(f" {v.mountpoint} " not in mounted for v in info.volumes)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_thin_lvs_mount_read_only_from_a_read_only_pool(engine: Engine, thin: Guest, scratch: Path) -> None:
    image = images.convert(thin.raw, scratch / "fedora.qcow2", "qcow2")
    before = sha256(image)
    info = mount(engine, image, scratch / "media")  # every volume: the thin LVs' filesystems show once mapped
    assert {v.name: v.filesystem for v in info.volumes} == dict(thin.fstypes)
    for v in info.volumes:
        guests.check_files(Path(v.mountpoint), thin.files[v.name])
    assert dm_targets(engine, info) == TARGETS
    assert leftovers.device_descriptors() == set(), "the mount's partitions are still held by the engine"
    pool = dm_table(f"imgmount-{info.id}-{VG}-pool00")
    assert pool[2] == "thin-pool" and pool[-4:] == ["3", "skip_block_zeroing", "ignore_discard", "read_only"]
    assert engine.verify(info.id) == []
    unmount_and_check_gone(engine, info)
    assert sha256(image) == before, "a read-only mount wrote to the image"


def test_a_read_write_thin_lv_keeps_what_was_written(engine: Engine, thin: Guest, scratch: Path) -> None:
    image = images.convert(thin.raw, scratch / "rw.qcow2", "qcow2")
    data = os.urandom(8 * images.MiB)  # more than the pool had allocated: new blocks from the pool
    info = mount(engine, image, scratch / "media", read_only=False, volumes=(f"{VG}/home",))
    assert dm_table(f"imgmount-{info.id}-{VG}-pool00")[-2:] == ["1", "error_if_no_space"]
    (Path(info.volumes[0].mountpoint) / "new.bin").write_bytes(data)
    unmount_and_check_gone(engine, info)
    images.run(["qemu-img", "check", "-f", "qcow2", str(image)])
    again = mount(engine, image, scratch / "media", volumes=(f"{VG}/home",))
    home = Path(again.volumes[0].mountpoint)
    assert (home / "new.bin").read_bytes() == data
    guests.check_files(home, thin.files[f"{VG}/home"])
    unmount_and_check_gone(engine, again)


def test_two_clones_with_the_same_names_side_by_side(engine: Engine, thin: Guest, scratch: Path) -> None:
    first = images.convert(thin.raw, scratch / "one.qcow2", "qcow2")
    second = images.convert(thin.raw, scratch / "two.qcow2", "qcow2")  # same VG, LV and pool uuids
    a = mount(engine, first, scratch / "media", volumes=(f"{VG}/root",))
    b = mount(engine, second, scratch / "media", volumes=(f"{VG}/root",))
    assert a.volumes[0].device != b.volumes[0].device
    for m in (a, b):
        guests.check_files(Path(m.volumes[0].mountpoint), thin.files[f"{VG}/root"])
    unmount_and_check_gone(engine, a)
    unmount_and_check_gone(engine, b)


def test_a_fault_at_every_step_leaves_nothing_behind(engine: Engine, thin: Guest, scratch: Path) -> None:
    """Injected faults (a failure we cannot cause for real at each exact step): the N-th step of the attach
    fails, before or after each layer (nbd, partition, tmeta, tdata, pool, thin, mount); every step is
    tried until the mount succeeds."""
    image = images.convert(thin.raw, scratch / "fault.qcow2", "qcow2")
    media = scratch / "media"
    before = leftovers.snapshot()
    for step in range(1, 40):
        faulty = Engine(engine.journal, settings=Settings(fault_at=step))
        try:
            info = mount(faulty, image, media, volumes=(f"{VG}/root",))
        except InjectedFault as exc:
            assert f"step {step}" in str(exc)
            assert leftovers.snapshot().new_since(before) == [], f"leftovers after a fault at step {step}"
            assert engine.mounts() == []
            continue
        assert step > 14, "the attach has fewer fault points than layers"
        unmount_and_check_gone(engine, info)
        break
    else:
        pytest.fail("the mount never succeeded")
