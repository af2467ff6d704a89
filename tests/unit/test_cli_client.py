"""The commands' own small D-Bus client (:mod:`mountd.cli.client`, issue 11 item 5): what it writes is what
dbus-fast (the daemon's library) reads, what dbus-fast writes it reads, and a command on a terminal lets
polkit ask. Pure: no bus, no daemon (the commands through it to the real imgmountd are in
tests/host/test_client.py)."""

from __future__ import annotations

import io
import sys

import pytest
from dbus_fast import Message, MessageFlag
from dbus_fast import Variant as FastVariant
from dbus_fast._private.unmarshaller import Unmarshaller

from mountd.cli.client import ALLOW_INTERACTIVE_AUTHORIZATION, Call, Reply, Variant, marshal_call, unmarshal
from mountd.cli.daemonclient import DaemonClient


def unmarshalled(data: bytes) -> Message:
    """``data`` as dbus-fast reads it: one whole message (its reader takes the buffered pair it declares)."""
    msg = Unmarshaller(io.BufferedRWPair(io.BytesIO(data), io.BytesIO())).unmarshall()
    assert msg is not None, "dbus-fast read no whole message"
    return msg


def test_calls_are_what_dbus_fast_reads() -> None:
    options = {"read-only": Variant("b", False), "volumes": Variant("as", ["p1", "vg/lv"]),
               "format": Variant("s", "qcow2"), "mount-options": Variant("as", [])}
    data = marshal_call(7, Call("io.github.imgmount.Mountd1", "/io/github/imgmount/Mountd1", "a.b.Manager",
                                "Mount", "sa{sv}", ["/srv/ä.raw", options], ALLOW_INTERACTIVE_AUTHORIZATION))
    msg = unmarshalled(data)
    assert (msg.serial, msg.path, msg.interface, msg.member, msg.destination, msg.signature) == (
        7, "/io/github/imgmount/Mountd1", "a.b.Manager", "Mount", "io.github.imgmount.Mountd1", "sa{sv}")
    assert msg.flags == MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
    assert msg.body[0] == "/srv/ä.raw"
    assert {k: (v.signature, v.value) for k, v in msg.body[1].items()} == {k: tuple(v) for k, v in options.items()}
    unmount = marshal_call(8, Call("d.e", "/m", "d.e.M", "Unmount", "oa{sv}", ["/m/1", {"force": Variant("b", True)}]))
    assert unmarshalled(unmount).body == ["/m/1", {"force": FastVariant("b", True)}]


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
