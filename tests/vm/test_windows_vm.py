"""A Windows disk on a real Debian kernel (nbd, kernel partitions): the ESP and the exFAT volume through the
kernel's vfat and exfat, NTFS through ntfs-3g (Debian 12's kernel has no ntfs3; through ntfs3 where it has
it), side by side in one mount, each with the owner's uid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import windows
from mountd.engine.engine import Engine
from mountd.host.filesystems import mountable_types
from mountd.host.processes import is_alive
from mountd.model import MountRequest
from tests.support.engines import engine_in

OWNER = 4243


@pytest.fixture
def engine(scratch: Path) -> Iterator[Engine]:
    with engine_in(scratch / "state") as eng:
        yield eng


def test_kernel_drivers_where_the_kernel_has_them_and_ntfs3g_beside(engine: Engine, scratch: Path) -> None:
    guest = windows.windows_guest(scratch / "win.raw")
    image = windows.vhdx(guest, scratch / "win.vhdx")
    kernel = mountable_types()
    assert {"vfat", "exfat"} <= kernel, "Debian's kernel has vfat and exfat modules"
    info = engine.mount(MountRequest(str(image), mount_root=str(scratch / "media"), owner=OWNER))
    assert info.backend == "nbd"
    shown = {line.split()[4]: line.split(" - ")[1].split()[0]
             for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    ntfs = "ntfs3" if "ntfs3" in kernel else "fuseblk"
    assert {v.name: shown[v.mountpoint] for v in info.volumes} == {
        "p1": "vfat", "p3": ntfs, "p4": ntfs, "p5": "exfat"}
    for v in info.volumes:
        for name, data in guest.files[v.name].items():  # the kernel's vfat shows Windows' lowercase names
            path = Path(v.mountpoint) / name
            assert path.read_bytes() == data, f"{v.name}: {name}"
            assert path.stat().st_uid == OWNER
    drivers = [(r.identity["pid"], r.identity["start_time"]) for r in engine.journal.read(info.id).layers
               if r.kind == "mount" and r.identity.get("driver")]
    assert len(drivers) == (0 if ntfs == "ntfs3" else 2)
    engine.unmount(info.id)
    assert not any(is_alive(*d) for d in drivers)
    assert engine.mounts() == []
