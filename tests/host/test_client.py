"""The commands' own small D-Bus client (:mod:`mountd.cli.client`, issue 11 item 5): the commands through it to
the real imgmountd on a private bus, importing neither dbus-fast nor asyncio nor the engine. Its wire format
against dbus-fast's is tested in tests/unit/test_cli_client.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import as_user
from mountd.busnames import MOUNT_IFACE, MOUNTS_PATH
from tests.support.guests import Guest

BIN = Path(sys.executable).parent
#: The commands' lean path imports the floor below none of these packages (issue 11 items 1 and 5).
NOT_IMPORTED = ("dbus_fast", "asyncio", "mountd.service", "mountd.engine", "mountd.layers", "mountd.image",
                "mountd.host")


def _command(bus_address: str, *argv: str, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: x for k, x in os.environ.items() if k != "IMGMOUNT_STATE_DIR"}
    env["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address
    return subprocess.run([*(user or []), str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=env, check=False, timeout=120)


def test_commands_mount_list_unmount_through_the_daemon(bus: Bus, c: Client, daemon: Daemon, guest: Guest,
                                                        users: dict[str, tuple[int, int]]) -> None:
    mounted = _command(bus.address, "imgmount", str(guest.raw), "--volume", "disk", "-o", "noatime", "--json")
    assert mounted.returncode == 0, mounted.stderr
    info = json.loads(mounted.stdout)
    path = f"{MOUNTS_PATH}/{info['id']}"
    assert c.manager("ListMounts").value() == [path]  # the daemon's mount, not an in-process one
    props = c.props(path, MOUNT_IFACE)
    assert (info["image"], info["read_only"], info["owner"], info["image_id"]) == (
        props["Image"], True, 0, props["ImageIdentity"])
    assert [v["mountpoint"] for v in info["volumes"]] == [props["Volumes"][0][3]]
    assert "noatime" in Path("/proc/self/mountinfo").read_text().split(props["Volumes"][0][3], 1)[1].split("\n")[0]
    listed = _command(bus.address, "imgmount", "--list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [{**info, "state": "mounted"}]
    text = _command(bus.address, "imgmount", "--list")
    assert text.stdout.startswith(f"{guest.raw}: raw, read-only") and f"(id {info['id']})" in text.stdout
    assert _command(bus.address, "imgumount", str(guest.raw)).returncode == 0
    assert c.manager("ListMounts").value() == []
    # Errors keep their names and exit codes.
    gone = _command(bus.address, "imgumount", str(guest.raw), "--json")
    assert gone.returncode == 3 and json.loads(gone.stdout)["error"] == "NotFound"
    bad = _command(bus.address, "imgmount", str(guest.raw.parent))
    assert bad.returncode == 2 and "is a directory" in bad.stderr
    refused = _command(bus.address, "imgmount", str(guest.raw), user=as_user(*users["bin"]))
    assert refused.returncode == 9 and refused.stderr.startswith("imgmount: without polkit only root")
    unknown = _command(bus.address, "imgmount", str(guest.raw), "-o", "nosuch")
    assert unknown.returncode == 2, unknown.stderr
    assert c.manager("ListMounts").value() == []


def test_no_usable_bus_address(bus: Bus, users: dict[str, tuple[int, int]]) -> None:
    for address in ("tcp:host=localhost,port=1", "unix:path=/nonexistent/socket", "nonsense"):
        alone = _command(address, "imgmount", "--list", user=as_user(*users["bin"]))
        assert alone.returncode == 1 and "the imgmount daemon is not reachable" in alone.stderr, alone.stderr


CHILD = """
import json, sys
from mountd.cli.main import imgmount_main, imgumount_main
codes = [imgmount_main(["--list", "--json"]), imgumount_main(["/nonexistent.raw"])]
print(json.dumps([codes, [m for m in {names!r} if m in sys.modules]]))
"""


def test_the_command_path_imports_no_dbus_library_nor_engine(bus: Bus, daemon: Daemon) -> None:
    env = {k: x for k, x in os.environ.items() if k != "IMGMOUNT_STATE_DIR"}
    env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    out = subprocess.run([sys.executable, "-c", CHILD.format(names=NOT_IMPORTED)], capture_output=True,
                         text=True, env=env, check=True, timeout=60)
    result: list[Any] = json.loads(out.stdout.splitlines()[-1])
    assert result == [[0, 3], []], out.stderr
