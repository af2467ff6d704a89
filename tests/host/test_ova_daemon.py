"""An OVA through imgmountd's D-Bus API: Inspect lists its disks, Mount mounts the volumes it names."""

from __future__ import annotations

from pathlib import Path

from imgmount_testkit.client import Client
from imgmount_testkit.ova import build_ova
from mountd.service.dbusapi import MOUNT_IFACE
from tests.support import guests
from tests.support.daemon_calls import v


def test_inspect_and_mount_an_ova(c: Client, shared: Path) -> None:
    work = shared / "ova"
    work.mkdir()
    mbr, whole = guests.mbr_guest(work / "one.raw"), guests.whole_disk_guest(work / "two.raw")
    ova = build_ova(work, "appliance", [mbr.raw, whole.raw])
    found = c.manager("Inspect", "sa{sv}", str(ova), {}).value()
    assert found["format"].value == "ova" and found["disks"].signature == "aa{sv}"
    assert [(d["name"].value, d["virtual-size"].value) for d in found["disks"].value] == [
        ("disk1", 160 << 20), ("disk2", 64 << 20)]
    assert "disk1/p5" in [x["name"].value for x in found["volumes"].value]
    media = work / "media"
    path = c.mount(ova, **{"volumes": v("as", ["disk1/p5", "disk2"]), "mount-root": v("s", str(media))}).value()
    props = c.props(path, MOUNT_IFACE)
    assert props["Format"] == "ova"
    mounted = {name: mountpoint for name, _, _, mountpoint in props["Volumes"]}
    assert sorted(mounted) == ["disk1/p5", "disk2"]
    guests.check_files(Path(mounted["disk1/p5"]), mbr.files["p5"])
    guests.check_files(Path(mounted["disk2"]), whole.files["disk"])
    c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value()
    assert list(media.iterdir()) == []
