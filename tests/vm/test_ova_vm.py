"""An OVA on a real kernel: each disk on an nbd device of its own, the kernel's partition nodes, and the LVs
of its disks through our own device-mapper tables, two volume groups of the same name side by side, as in an
appliance whose disks were made from one template (issue 10, item 3)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.ova import build_ova
from mountd.engine.engine import Engine
from mountd.model import MountRequest
from tests.support import guests
from tests.support.engines import engine_in


@pytest.fixture
def engine(scratch: Path) -> Iterator[Engine]:
    with engine_in(scratch / "state") as eng:
        yield eng


def data_disk(path: Path) -> dict[str, bytes]:
    """A whole-disk LVM PV with a VG named ``guestvg`` too, and an ext4 LV ``root`` of its own files."""
    files = {"data.txt": b"the second disk's own root\n", "blob.bin": bytes(range(256)) * 64}
    raw = images.blank(path, 64 * images.MiB)
    images.make_lvm(raw, 0, 64 * images.MiB, "guestvg", [images.LvSpec("root", 24, "ext4", "data", files)])
    return files


def test_an_ova_on_the_nbd_backend(engine: Engine, scratch: Path) -> None:
    gpt, second = guests.small_gpt_guest(scratch / "one.raw"), data_disk(scratch / "two.raw")
    ova = build_ova(scratch, "appliance", [gpt.raw, scratch / "two.raw"])
    info = engine.mount(MountRequest(image=str(ova), mount_root=str(scratch / "media"), backend="nbd"))
    expected = {**{f"disk1/{v}": f for v, f in gpt.files.items()}, "disk2/guestvg/root": second}
    assert sorted(v.name for v in info.volumes) == sorted(expected)
    for v in info.volumes:
        guests.check_files(Path(v.mountpoint), expected[v.name])
    layers = engine.journal.read(info.id).layers
    nbds = [str(x.identity["node"]) for x in layers if x.kind == "nbd"]
    assert len(set(nbds)) == 2
    kinds = {x.volume: x.kind for x in layers if x.kind != "mount" and x.volume}
    assert kinds == {"disk1/p1": "partition", "disk1/p2": "partition", "disk1/guestvg/root": "dm",
                     "disk2/guestvg/root": "dm"}
    engine.unmount(info.id)
    for node in nbds:
        assert not (Path("/sys/block") / Path(node).name / "pid").exists()
    dm = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    assert f"imgmount-{info.id}" not in dm
