"""The commands' own small D-Bus client (:mod:`mountd.cli.client`, issue 11 item 5): its wire format against
dbus-fast's, and the commands through it to the real imgmountd on a private bus, importing neither dbus-fast
nor asyncio nor the engine."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageFlag
from dbus_fast import Variant as FastVariant
from dbus_fast._private.unmarshaller import Unmarshaller

from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import as_user
from mountd.busnames import MOUNT_IFACE, MOUNTS_PATH
from mountd.cli.client import ALLOW_INTERACTIVE_AUTHORIZATION, Call, Reply, Variant, marshal_call, unmarshal
from mountd.cli.daemonclient import DaemonClient
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


def test_calls_are_what_dbus_fast_reads() -> None:
    options = {"read-only": Variant("b", False), "volumes": Variant("as", ["p1", "vg/lv"]),
               "format": Variant("s", "qcow2"), "mount-options": Variant("as", [])}
    data = marshal_call(7, Call("io.github.imgmount.Mountd1", "/io/github/imgmount/Mountd1", "a.b.Manager",
                                "Mount", "sa{sv}", ["/srv/ä.raw", options], ALLOW_INTERACTIVE_AUTHORIZATION))
    reader = Unmarshaller(io.BytesIO(data))
    reader.unmarshall()
    msg = reader.message
    assert (msg.serial, msg.path, msg.interface, msg.member, msg.destination, msg.signature) == (
        7, "/io/github/imgmount/Mountd1", "a.b.Manager", "Mount", "io.github.imgmount.Mountd1", "sa{sv}")
    assert msg.flags == MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
    assert msg.body[0] == "/srv/ä.raw"
    assert {k: (v.signature, v.value) for k, v in msg.body[1].items()} == {k: tuple(v) for k, v in options.items()}
    unmount = marshal_call(8, Call("d.e", "/m", "d.e.M", "Unmount", "oa{sv}", ["/m/1", {"force": Variant("b", True)}]))
    reader = Unmarshaller(io.BytesIO(unmount))
    reader.unmarshall()
    assert reader.message.body == ["/m/1", {"force": FastVariant("b", True)}]


def test_replies_are_read_as_dbus_fast_writes_them() -> None:
    call = Message(destination="io.x", path="/p", member="GetManagedObjects", serial=3)
    props = {"Image": FastVariant("s", "/srv/ä.raw"), "ReadOnly": FastVariant("b", False),
             "Owner": FastVariant("u", 1000), "Volumes": FastVariant("a(ssss)", [["disk", "/dev/loop0", "ext4", "/m"]]),
             "Notes": FastVariant("a{ss}", {"disk": "dirty"}), "Size": FastVariant("x", -5),
             "Ratio": FastVariant("d", 0.5), "Nested": FastVariant("v", FastVariant("ay", b"\x01\x02"))}
    reply = Message.new_method_return(call, "a{oa{sa{sv}}}", [{"/p/1": {"io.M": props, "io.Empty": {}}}])
    got = unmarshal(bytes(reply._marshall(False)))
    assert got.body == [{"/p/1": {"io.M": {
        "Image": "/srv/ä.raw", "ReadOnly": False, "Owner": 1000, "Volumes": [("disk", "/dev/loop0", "ext4", "/m")],
        "Notes": {"disk": "dirty"}, "Size": -5, "Ratio": 0.5, "Nested": [1, 2]}, "io.Empty": {}}}]
    error = Message.new_error(call, "io.github.imgmount.Mountd1.Error.NotFound", "no such mount")
    got = unmarshal(bytes(error._marshall(False)))
    assert got.fields[4] == "io.github.imgmount.Mountd1.Error.NotFound" and got.body == ["no such mount"]


class _RecordingBus:
    """Stands in for a BusConnection: records each call, answers with an empty GetManagedObjects."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def call(self, call: Call) -> Reply:
        self.calls.append(call)
        return Reply(None, [{}])

    def close(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_a_terminal_lets_polkit_ask(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: tty)
    bus = _RecordingBus()
    assert DaemonClient(bus).mounts() == []  # type: ignore[arg-type]
    assert bus.calls[0].flags == (ALLOW_INTERACTIVE_AUTHORIZATION if tty else 0)
    assert ALLOW_INTERACTIVE_AUTHORIZATION == MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION.value


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
