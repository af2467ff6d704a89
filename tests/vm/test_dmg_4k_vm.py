"""The nbd backend on a real kernel with a DMG (Debian's qemu-nbd exits 1 on its missing-module notes, although
its server runs) and with a GPT written for 4096-byte sectors (the nbd device has 512-byte sectors, so the
kernel's scan finds no partition: the parser's offsets go on loop devices)."""

from __future__ import annotations

from pathlib import Path

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.model import MountInfo, MountRequest
from tests.support import leftovers
from tests.support.macdisk import gpt_dmg
from tests.support.wide_sectors import gpt4k_guest
from tests.vm.test_engine_vm import _check, _kinds


def _mount_nbd(engine: Engine, image: Path, root: Path) -> MountInfo:
    return engine.mount(MountRequest(image=str(image), mount_root=str(root), backend="nbd"))


def test_the_nbd_backend_mounts_a_dmg(engine: Engine, scratch: Path) -> None:
    mac = gpt_dmg(scratch)
    before = leftovers.snapshot()
    info = _mount_nbd(engine, mac.dmg, scratch / "media")
    assert (info.backend, info.format) == ("nbd", "dmg") and info.device.startswith("/dev/nbd")
    _check(info, mac.guest)
    assert _kinds(engine, info) == {"p1": "partition", "p2": "partition"}  # 512-byte sectors: the kernel's
    engine.unmount(info.id)
    assert leftovers.snapshot().new_since(before) == []


def test_a_4k_sector_gpt_on_nbd_uses_the_parsers_offsets(engine: Engine, scratch: Path) -> None:
    guest = gpt4k_guest(scratch / "wide.raw")
    image = images.convert(guest.raw, scratch / "wide.qcow2", "qcow2")
    before = leftovers.snapshot()
    info = _mount_nbd(engine, image, scratch / "media")
    nbd = Path("/sys/block") / Path(info.device).name
    assert (nbd / "queue" / "logical_block_size").read_text().strip() == "512"
    assert not list(nbd.glob(f"{nbd.name}p*"))  # the kernel's scan found no partition: the cause
    _check(info, guest)
    assert _kinds(engine, info) == {"p1": "loop", "p2": "loop", "p3": "loop", "widevg/data": "dm"}
    engine.unmount(info.id)
    assert leftovers.snapshot().new_since(before) == []
