"""The commands (imgmount, imgumount) through imgmountd for real, and D-Bus activation or in-process where
no daemon runs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client, client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import as_user
from mountd.service.dbusapi import BUS_NAME, MOUNTS_PATH
from tests.support.daemon_calls import BIN, command, wait_gone
from tests.support.guests import Guest

_command = command


def test_commands_go_through_the_daemon(bus: Bus, c: Client, daemon: Daemon, guest: Guest,
                                        users: dict[str, tuple[int, int]], group: int,
                                        files: dict[str, Path]) -> None:
    mounted = _command(bus.address, "imgmount", str(guest.raw), "--json")
    assert mounted.returncode == 0, mounted.stderr
    info = json.loads(mounted.stdout)
    assert c.manager("ListMounts").value() == [f"{MOUNTS_PATH}/{info['id']}"]  # the daemon's mount
    assert json.loads(_command(bus.address, "imgmount", "--list", "--json").stdout)[0]["id"] == info["id"]
    refused = _command(bus.address, "imgmount", str(guest.raw), user=as_user(*users["bin"]))
    assert refused.returncode == 9 and refused.stderr.startswith("imgmount: without polkit only root")
    assert _command(bus.address, "imgumount", info["volumes"][0]["mountpoint"]).returncode == 0
    gone = _command(bus.address, "imgumount", str(guest.raw))
    assert gone.returncode == 3 and gone.stderr.count("\n") == 1 and "not mounted" in gone.stderr
    bad = _command(bus.address, "imgmount", str(guest.raw.parent))
    assert bad.returncode == 2 and "is a directory" in bad.stderr
    member = as_user(*users["daemon"], (group,))
    hers = _command(bus.address, "imgmount", str(files["mine"]), "--json", user=member)
    assert hers.returncode == 0, hers.stderr
    assert json.loads(hers.stdout)["image"] == str(files["mine"])
    assert _command(bus.address, "imgumount", str(files["mine"]), user=member).returncode == 0
    assert c.manager("ListMounts").value() == []


def test_commands_activate_the_daemon_or_run_in_process(bus: Bus, tmp_path: Path, guest: Guest,
                                                         users: dict[str, tuple[int, int]]) -> None:
    service = bus.home / "services" / f"{BUS_NAME}.service"
    service.write_text(f"[D-BUS Service]\nName={BUS_NAME}\nExec=/usr/bin/env IMGMOUNT_STATE_DIR={tmp_path} "
                       f"{BIN / 'imgmountd'} --bus {bus.address}\n")
    with client(bus.address) as c:
        c.driver("ReloadConfig")
        try:
            listed = _command(bus.address, "imgmount", "--list")
            assert (listed.returncode, listed.stdout) == (0, "nothing is mounted\n"), listed.stderr
            pid = c.driver("GetConnectionUnixProcessID", "s", BUS_NAME)
        finally:
            service.unlink()
            c.driver("ReloadConfig")
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    # Activation fails: root runs the engine in-process; anyone else is told why.
    service.write_text(f"[D-BUS Service]\nName={BUS_NAME}\nExec=/bin/false\n")
    with client(bus.address) as c:
        c.driver("ReloadConfig")
        try:
            fallback = _command(bus.address, "imgmount", "--list")
            assert fallback.returncode == 0 and "running the engine in-process instead" in fallback.stderr
            failed = _command(bus.address, "imgmount", "--list", user=as_user(*users["bin"]))
            assert failed.returncode == 1 and "imgmountd could not be started" in failed.stderr
        finally:
            service.unlink()
            c.driver("ReloadConfig")
    # No daemon to activate: root runs the engine in-process; anyone else is told what is missing.
    nowhere = f"unix:path={tmp_path}/no-bus"
    assert _command(nowhere, "imgmount", "--list").returncode == 0
    alone = _command(nowhere, "imgmount", "--list", user=as_user(*users["bin"]))
    assert alone.returncode == 1 and "the imgmount daemon is not reachable" in alone.stderr
