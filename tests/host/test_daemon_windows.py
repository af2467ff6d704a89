"""A Windows vhdx of a non-root caller, through the real imgmountd: the FUSE filesystem drivers give her the
files as hers, no one else reads them, a SIGKILL of the daemon loses no driver, and unmount leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from imgmount_testkit import windows
from imgmount_testkit.bus import Bus
from imgmount_testkit.client import client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import OtherUser, as_user
from mountd.host.filesystems import mountable_types
from mountd.host.fusedrivers import DRIVERS, find_driver
from mountd.service.dbusapi import MANAGER_IFACE, MANAGER_PATH, MOUNT_IFACE

pytestmark = pytest.mark.skipif(bool({"ntfs3", "vfat", "exfat"} & mountable_types()),
                                reason="this kernel mounts some of these itself: the FUSE drivers are not used")


def drivers_serving(paths: list[str]) -> list[tuple[int, int]]:
    """Root's live FUSE driver processes whose command line names one of ``paths``."""
    return [found for path in paths for driver in DRIVERS.values()
            if (found := find_driver(driver, path)) is not None]


def test_a_members_windows_vhdx(bus: Bus, run: Path, shared: Path, other: Callable[..., OtherUser],
                                users: dict[str, tuple[int, int]], group: int) -> None:
    uid, gid = users["daemon"]
    guest = windows.windows_guest(shared / "win.raw")
    image = windows.vhdx(guest, shared / "her-windows.vhdx")
    os.chown(image, uid, gid)
    image.chmod(0o600)
    member = other(uid, gid, groups=(group,))
    daemon = Daemon(bus, run).start()
    try:
        path = member.mount(image).value()
        with client(bus.address) as c:
            props = c.props(path, MOUNT_IFACE)
            volumes = {name: mnt for name, _, _, mnt in props["Volumes"]}
        assert (props["Owner"], props["Backend"], sorted(volumes)) == (uid, "fuse", ["p1", "p3", "p4", "p5"])
        mountpoints = list(volumes.values())
        drivers = drivers_serving(mountpoints)
        assert len(drivers) == 4
        for name in ("p3", "p5"):
            first, data = next(iter(guest.files[name].items()))
            target = Path(volumes[name]) / first
            assert target.stat().st_uid == uid
            assert subprocess.run([*as_user(uid, gid), "cat", str(target)], capture_output=True,
                                  check=True).stdout == data
            stranger = subprocess.run([*as_user(*users["bin"]), "cat", str(target)], capture_output=True,
                                      text=True, check=False)
            assert stranger.returncode != 0 and "Permission denied" in stranger.stderr
        assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        assert drivers_serving(mountpoints) == drivers  # the drivers outlive the daemon
        daemon.start()
        with client(bus.address) as c:
            assert c.manager("ListMounts").value() == [path]
            assert c.prop(path, MOUNT_IFACE, "State") == "mounted"  # adopted: mounts and drivers verified
        assert member.unmount(path).value() is None
        assert drivers_serving(mountpoints) == []
        assert not any(os.path.exists(m) for m in mountpoints)
        assert member.call(MANAGER_PATH, MANAGER_IFACE, "ListMounts").value() == []
    finally:
        daemon.close()
