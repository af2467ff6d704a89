"""imgmountd's D-Bus API for real: its methods, properties and signals against the interface file shipped
in the package (mountd/data), busctl as a client, and many clients at once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path
from typing import Any

import mountd
from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client, call_message, client, connect, plain, reply_of
from imgmount_testkit.daemon import Daemon
from mountd.engine.inspection import inspect_image
from mountd.engine.render import inspection_to_dict
from mountd.host.support import check_host
from mountd.service.dbusapi import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, MOUNT_IFACE, MOUNTS_PATH
from tests.support import guests
from tests.support.daemon_calls import OM, copy, qcow2, v
from tests.support.guests import Guest

INTROSPECTION = resources.files("mountd") / "data" / f"{BUS_NAME}.xml"


# --- the API: methods, properties, signals ----------------------------------------------------------------


def test_introspection_matches_the_committed_copy(c: Client, guest: Guest) -> None:
    """An accidental change of the API (a method, argument, property, signal) fails here. After a deliberate
    addition, regenerate mountd/data/io.github.imgmount.Mountd1.xml and
    review the diff."""
    path = c.mount(guest.raw).value()
    found = []
    for where, name in ((MANAGER_PATH, MANAGER_IFACE), (path, MOUNT_IFACE)):
        xml = c.call(where, "org.freedesktop.DBus.Introspectable", "Introspect").value()
        node = ET.fromstring(xml)
        found.append(_canonical(next(i for i in node.findall("interface") if i.get("name") == name)))
        if where == MANAGER_PATH:
            assert OM in {i.get("name") for i in node.findall("interface")}
    committed = ET.fromstring(INTROSPECTION.read_text())
    assert found == [_canonical(i) for i in committed.findall("interface")]


def _canonical(element: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(element, encoding="unicode"), strip_text=True)


def test_methods_properties_and_signals(c: Client, guest: Guest, shared: Path) -> None:
    c.watch()
    assert c.prop(MANAGER_PATH, MANAGER_IFACE, "Version") == mountd.__version__
    assert c.prop(MANAGER_PATH, MANAGER_IFACE, "Backends") == check_host().backends()
    path = c.mount(guest.raw).value()
    assert path.startswith(MOUNTS_PATH + "/")
    assert c.wait_signal(lambda m: m.member == "MountAdded").body == [path]
    added = c.wait_signal(lambda m: m.member == "InterfacesAdded")
    assert (added.path, added.body[0], list(added.body[1])) == (MANAGER_PATH, path, [MOUNT_IFACE])
    props = c.props(path, MOUNT_IFACE)
    device = props["Device"]
    assert device.startswith("/dev/loop")
    assert props == {"Image": str(guest.raw), "Format": "raw", "ReadOnly": True, "Owner": 0, "Backend": "loop",
                     "Device": device, "Volumes": [("disk", device, "ext4", "/run/media/root/disk")],
                     "State": "mounted", "ImageIdentity": f"{guest.raw.stat().st_dev}:{guest.raw.stat().st_ino}",
                     "Notes": {}}
    guests.check_files(Path("/run/media/root/disk"), guest.files["disk"])

    assert c.mount(guest.raw).value() == path  # the same image twice: the same object
    rw = c.mount(copy(guest.raw, shared / "rw.raw"), **{"read-only": v("b", False),
                                                      "mount-root": v("s", str(shared / "media"))}).value()
    assert c.props(rw, MOUNT_IFACE)["ReadOnly"] is False
    assert sorted(c.manager("ListMounts").value()) == sorted([path, rw])
    managed = c.call(MANAGER_PATH, OM, "GetManagedObjects").value()
    assert sorted(managed) == sorted([path, rw]) and all(list(x) == [MOUNT_IFACE] for x in managed.values())

    assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value() is None
    assert c.wait_signal(lambda m: m.member == "MountRemoved").body == [path]
    removed = c.wait_signal(lambda m: m.member == "InterfacesRemoved")
    assert (removed.path, removed.body) == (MANAGER_PATH, [path, [MOUNT_IFACE]])
    assert c.manager("Unmount", "oa{sv}", rw, {"force": v("b", False)}).value() is None
    assert c.manager("ListMounts").value() == []
    assert not Path("/run/media/root/disk").exists()


def test_busctl_as_a_client(bus: Bus, daemon: Daemon, guest: Guest) -> None:
    def busctl(*args: str) -> Any:
        out = subprocess.run(["busctl", f"--address={bus.address}", "--json=short", *args], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)["data"] if out else None

    path = busctl("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}", str(guest.raw), "1",
                  "read-only", "b", "true")[0]
    assert busctl("get-property", BUS_NAME, path, MOUNT_IFACE, "Format") == "raw"
    assert busctl("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListMounts") == [[path]]
    busctl("call", BUS_NAME, path, MOUNT_IFACE, "Unmount", "a{sv}", "0")
    assert busctl("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListMounts") == [[]]


def test_inspect_returns_the_json_shape(c: Client, shared: Path) -> None:
    mbr = guests.mbr_guest(shared / "mbr.raw")
    image = qcow2(mbr.raw, shared / "mbr.qcow2")
    found = c.manager("Inspect", "sa{sv}", str(image), {"format": v("s", "qcow2")}).value()
    in_process = inspect_image(str(image), host=check_host())  # the daemon's host is this one
    assert plain(found) == _without_nulls(inspection_to_dict(in_process))
    assert found["host"].value["backends"].signature == "as"
    assert found["chain"].signature == "aa{sv}" and found["chain"].value[0]["extents"].signature == "as"


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(x) for k, x in value.items() if x is not None}
    if isinstance(value, list):
        return [_without_nulls(x) for x in value]
    return value


# --- concurrency ------------------------------------------------------------------------------------------


def test_many_clients_at_once(bus: Bus, daemon: Daemon, guest: Guest, shared: Path) -> None:
    """8 clients mount one image at once: one object. 16 clients mount 16 images at once: 16 objects. And a
    slow mount (QEMU through FUSE) does not keep a ListMounts waiting."""
    many = [copy(guest.raw, shared / f"many{i}.raw") for i in range(16)]
    slow = qcow2(guest.raw, shared / "slow.qcow2")

    async def scenario() -> None:
        buses = [await connect(bus.address) for _ in range(16)]
        try:
            same = await asyncio.gather(*(b.call(call_message(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}",
                                                              [str(guest.raw), {}])) for b in buses[:8]))
            assert len({reply_of(r).value() for r in same}) == 1
            each = await asyncio.gather(*(b.call(call_message(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}",
                                                              [str(img), {}])) for b, img in zip(buses, many, strict=True)))
            assert len({reply_of(r).value() for r in each}) == 16
            pending = asyncio.ensure_future(buses[0].call(call_message(
                MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}", [str(slow), {"backend": v("s", "fuse")}])))
            listed = reply_of(await buses[1].call(call_message(MANAGER_PATH, MANAGER_IFACE, "ListMounts")))
            assert len(listed.value()) == 17 and not pending.done()
            reply_of(await pending).value()
            paths = reply_of(await buses[0].call(call_message(MANAGER_PATH, MANAGER_IFACE, "ListMounts"))).value()
            assert len(paths) == 18
            gone = await asyncio.gather(*(buses[i % 16].call(call_message(p, MOUNT_IFACE, "Unmount", "a{sv}", [{}]))
                                          for i, p in enumerate(paths)))
            failed = [f"{x.error}: {x.text}" for x in map(reply_of, gone) if x.error is not None]
            assert failed == []
        finally:
            for b in buses:
                b.disconnect()

    asyncio.run(scenario())
    with client(bus.address) as c:
        assert c.manager("ListMounts").value() == []
