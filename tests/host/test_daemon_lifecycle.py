"""imgmountd's life cycle for real: SIGKILL and a restart that republishes, a killed QEMU server, SIGTERM
that unmounts everything and flushes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client, client
from imgmount_testkit.daemon import Daemon
from mountd.service.dbusapi import BUS_NAME, MOUNT_IFACE
from tests.support import guests, leftovers
from tests.support.daemon_calls import copy, killed_and_restarted, mountpoint, qcow2, v, wait_gone
from tests.support.engines import first_volume
from tests.support.guests import Guest


def _eight(guest: Guest, where: Path) -> list[tuple[Path, bool]]:
    """4 raw (loop) and 4 qcow2 (FUSE) images; 2 of each read-write."""
    out = []
    for i in range(4):
        out.append((copy(guest.raw, where / f"life{i}.raw"), i < 2))
        out.append((qcow2(guest.raw, where / f"life{i}.qcow2"), i < 2))
    return out


def _write(mount: Path, name: str, *, sync: bool) -> bytes:
    data = hashlib.sha256(name.encode()).digest() * 32768  # 1 MiB
    with open(mount / "written.bin", "wb") as f:
        f.write(data)
        if sync:
            os.fsync(f.fileno())
    return data


def test_sigkill_loses_nothing_and_a_restart_republishes(bus: Bus, run: Path, tmp_path: Path,
                                                          guest: Guest) -> None:
    daemon = Daemon(bus, run).start()
    try:
        written = {}
        with client(bus.address) as c:
            for image, rw in _eight(guest, tmp_path):
                path = c.mount(image, **{"read-only": v("b", not rw)}).value()
                if rw:
                    written[path] = _write(mountpoint(c, path), image.name, sync=True)
        with killed_and_restarted(daemon) as (c, paths):
            assert len(paths) == 8
            for path, data in written.items():
                assert (mountpoint(c, path) / "written.bin").read_bytes() == data
                guests.check_files(mountpoint(c, path), guest.files["disk"])
            for path in paths:
                c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value()
        for image in tmp_path.glob("*.qcow2"):
            images.run(["qemu-img", "check", "-q", str(image)])
    finally:
        daemon.close()


def test_a_killed_qemu_server_makes_its_mount_broken(c: Client, daemon: Daemon, guest: Guest,
                                                     tmp_path: Path) -> None:
    before = leftovers.snapshot()
    path = c.mount(qcow2(guest.raw, tmp_path / "victim.qcow2"), backend=v("s", "fuse")).value()
    record = json.loads((daemon.state / "mounts" / f"{path.rsplit('/', 1)[1]}.json").read_text())
    pid = next(layer["identity"]["pid"] for layer in record["layers"] if layer["kind"] == "fuse")
    c.watch()
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    assert c.prop(path, MOUNT_IFACE, "State") == "broken"
    changed = c.wait_signal(lambda m: m.member == "PropertiesChanged" and m.path == path)
    assert changed.body[1]["State"].value == "broken"
    assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None
    assert c.manager("ListMounts").value() == []
    assert leftovers.snapshot().new_since(before) == []


def test_sigterm_unmounts_everything_and_flushes(bus: Bus, run: Path, tmp_path: Path, guest: Guest) -> None:
    before = leftovers.snapshot()
    daemon = Daemon(bus, run).start()
    written = {}
    try:
        with client(bus.address) as c:
            for image, rw in _eight(guest, tmp_path):
                path = c.mount(image, **{"read-only": v("b", not rw)}).value()
                if rw:
                    written[image] = _write(mountpoint(c, path), image.name, sync=False)
            # An image inside another mount: it must come off first, or the outer one would be busy.
            outer = next(iter(written))
            nested = copy(guest.raw, mountpoint(c, c.mount(outer, **{"read-only": v("b", False)}).value()) / "in.raw")
            c.mount(nested).value()
        assert daemon.signal(signal.SIGTERM) == 0
        assert list((daemon.state / "mounts").iterdir()) == []
        log = daemon.log()
        assert log.index(f"unmounted {nested}") < log.index(f"unmounted {outer}") and "lazy" not in log
    finally:
        daemon.close()
    assert leftovers.snapshot().new_since(before) == []
    for image, data in written.items():
        if image.suffix == ".qcow2":
            images.run(["qemu-img", "check", "-q", str(image)])
        with first_volume(image, tmp_path / "check") as inside:
            assert (inside / "written.bin").read_bytes() == data


def test_a_state_directory_it_cannot_make_stops_the_start_with_the_cause(bus: Bus, run: Path,
                                                                          tmp_path: Path) -> None:
    """Every mount would fail on it: the daemon says why once and does not take the name; the test kit
    reports the exit at once (not after its start timeout) and leaves nothing running on ``run``."""
    (tmp_path / "a-file").write_text("")
    state = tmp_path / "a-file" / "state"
    daemon = Daemon(bus, run, IMGMOUNT_STATE_DIR=str(state))
    with pytest.raises(RuntimeError, match=r"exited \(status 1\) before taking its name") as failed:
        daemon.start()
    assert f"cannot use the state directory {state}: Not a directory" in str(failed.value)
    assert daemon.exit_status == 1
    with client(bus.address) as c:
        assert not c.driver("NameHasOwner", "s", BUS_NAME)
