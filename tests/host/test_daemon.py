"""imgmountd for real: a private system-like dbus-daemon, the daemon process, real clients (dbus-fast,
busctl, the commands), callers of other uids (setpriv), a real polkitd, real mounts (loop and FUSE)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, Variant

import mountd
from mountd.auth import Caller
from mountd.backends import available
from mountd.cli import ERRORS, _error
from mountd.dbusapi import (
    BUS_NAME,
    ERROR_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    MOUNT_IFACE,
    MOUNTS_PATH,
    ApiInterface,
    api_method,
)
from mountd.engine import Engine
from mountd.errors import MountdError
from mountd.inspect import inspect_image
from mountd.journal import Journal
from mountd.model import MountRequest
from mountd.render import inspection_to_dict
from tests.support import guests, images, leftovers
from tests.support.bus import (
    REPO,
    Bus,
    Client,
    Daemon,
    OtherUser,
    as_user,
    call_message,
    client,
    connect,
    polkitd,
    private_bus,
    reply_of,
    servers_of,
    world_dir,
)
from tests.support.guests import Guest
from tests.support.vms import running_vm

OM = "org.freedesktop.DBus.ObjectManager"
PROPS = "org.freedesktop.DBus.Properties"
INTROSPECTION = REPO / "tests" / "data" / "introspection.xml"
BIN = Path(sys.executable).parent


def v(signature: str, value: Any) -> Variant:
    return Variant(signature, value)


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """Images live where other uids may look (pytest's tmp_path is root-only)."""
    path = world_dir("imgmount-daemon-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(shared: Path) -> Guest:
    return guests.whole_disk_guest(shared / "disk.raw")


def copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def qcow2(src: Path, dst: Path) -> Path:
    images.convert(src, dst, "qcow2")
    dst.chmod(0o644)
    return dst


def mountpoint(c: Client, path: str) -> Path:
    return Path(c.prop(path, MOUNT_IFACE, "Volumes")[0][3])


def error(reply: Any, name: str) -> str:
    """Assert ``reply`` is the error ``name`` (short names are ours) and return its message."""
    full = name if "." in name else ERROR_PREFIX + name
    assert reply.error == full, f"expected {full}, got {reply.error}: {reply.body}"
    return str(reply.text)


# --- the API: methods, properties, signals ----------------------------------------------------------------


def test_introspection_matches_the_committed_copy(c: Client, guest: Guest) -> None:
    """An accidental change of the API (a method, argument, property, signal) fails here. After a deliberate
    addition, regenerate tests/data/introspection.xml and review the diff."""
    path = c.mount(guest.raw).value()
    found = []
    for where, name in ((MANAGER_PATH, MANAGER_IFACE), (path, MOUNT_IFACE)):
        xml = c.call(where, "org.freedesktop.DBus.Introspectable", "Introspect").value()
        node = ET.fromstring(xml)
        found.append(_canonical(next(i for i in node.findall("interface") if i.get("name") == name)))
        if where == MANAGER_PATH:
            assert OM in {i.get("name") for i in node.findall("interface")}
    committed = ET.parse(INTROSPECTION).getroot()
    assert found == [_canonical(i) for i in committed.findall("interface")]


def _canonical(element: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(element, encoding="unicode"), strip_text=True)


def test_methods_properties_and_signals(c: Client, guest: Guest, shared: Path) -> None:
    c.watch()
    assert c.prop(MANAGER_PATH, MANAGER_IFACE, "Version") == mountd.__version__
    assert c.prop(MANAGER_PATH, MANAGER_IFACE, "Backends") == available()
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
    assert _plain(found) == _without_nulls(inspection_to_dict(inspect_image(str(image))))
    assert found["chain"].signature == "aa{sv}" and found["chain"].value[0]["extents"].signature == "as"


def _plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(x) for k, x in value.items()}
    if isinstance(value, list):
        return [_plain(x) for x in value]
    return value


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(x) for k, x in value.items() if x is not None}
    if isinstance(value, list):
        return [_without_nulls(x) for x in value]
    return value


# --- bad input --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_images(shared: Path, guest: Guest) -> dict[str, Path]:
    bad = shared / "bad"
    bad.mkdir()
    os.mkfifo(bad / "fifo")
    for name, backing in (("device-backing", "/dev/zero"), ("json-backing", 'json:{"file.driver":"nbd"}')):
        images.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
                    str(bad / f"{name}.qcow2"), "64M"])
    (bad / "corrupt.qcow2").write_bytes(b"QFI\xfb" + os.urandom(4092))
    return {"dir": bad, "fifo": bad / "fifo", "device-backing": bad / "device-backing.qcow2",
            "json-backing": bad / "json-backing.qcow2", "corrupt": bad / "corrupt.qcow2",
            "qcow2": qcow2(guest.raw, bad / "good.qcow2"), "raw": guest.raw}


def _mount(image: str, **options: Variant) -> tuple[str, str, list[Any]]:
    return ("Mount", "sa{sv}", [image, options])


BAD_CALLS: list[tuple[str, Any, str, str]] = [
    ("wrong argument types", ("Mount", "ss", ["{raw}", "x"]), "InvalidArgument", "takes arguments (sa{sv})"),
    ("unknown option", _mount("{raw}", rw=v("b", True)), "InvalidArgument", "unknown option (known options: backend, format"),
    ("wrong variant type", _mount("{raw}", **{"read-only": v("s", "no")}), "InvalidArgument",
     "must be of type b, not s"),
    ("relative path", _mount("disk.raw"), "InvalidArgument", "must be absolute"),
    ("path over PATH_MAX", _mount("/" + "x/" * 3000), "InvalidArgument", "longer than PATH_MAX"),
    ("newline in the path", _mount("/tmp/a\nb"), "InvalidArgument", "control character"),
    ("non-existent", _mount("/nonexistent/x.qcow2"), "NotFound", "no such image"),
    ("a directory", _mount("{dir}"), "InvalidArgument", "is a directory"),
    ("a FIFO", _mount("{fifo}"), "InvalidArgument", "not a regular file"),
    ("a device", _mount("/dev/zero"), "InvalidArgument", "not a regular file"),
    ("backing file is a device", _mount("{device-backing}"), "InvalidImage", "not a regular file"),
    ("backing file is json:", _mount("{json-backing}"), "InvalidImage", "names a protocol"),
    ("corrupt image", _mount("{corrupt}"), "InvalidImage", "corrupt"),
    ("comma in a mount option", _mount("{raw}", **{"mount-options": v("as", ["ro,exec"])}),
     "InvalidArgument", "mount option"),
    ("newline in a volume name", _mount("{raw}", volumes=v("as", ["disk\nx"])), "InvalidArgument",
     "control character"),
    ("comma in the format", _mount("{raw}", format=v("s", "raw,file.driver=nbd")), "InvalidArgument",
     "unknown format"),
    ("unknown backend", _mount("{raw}", backend=v("s", "magic")), "InvalidArgument", "unknown backend"),
    ("relative mount root", _mount("{raw}", **{"mount-root": v("s", "media")}), "InvalidArgument",
     "absolute"),
    ("unknown volume", _mount("{raw}", volumes=v("as", ["p9"])), "NotFound", "no volume named p9"),
    ("snapshot read-write", _mount("{qcow2}", snapshot=v("s", "s1"), **{"read-only": v("b", False)}),
     "InvalidArgument", "read-only"),
    ("loop backend for qcow2", _mount("{qcow2}", backend=v("s", "loop")), "Unsupported", "raw images only"),
    ("Inspect: unknown option", ("Inspect", "sa{sv}", ["{raw}", {"read-only": v("b", True)}]),
     "InvalidArgument", "unknown option"),
    ("Inspect: a FIFO", ("Inspect", "sa{sv}", ["{fifo}", {}]), "InvalidArgument", "not a regular file"),
    ("Unmount: not a mount", ("Unmount", "oa{sv}", [f"{MOUNTS_PATH}/nope", {}]), "NotFound", "no such mount"),
    ("Unmount: unknown option", ("Unmount", "oa{sv}", [f"{MOUNTS_PATH}/nope", {"lazy": v("b", True)}]),
     "InvalidArgument", "unknown option (known options: force)"),
    ("no such method", ("Format", "s", ["x"]), "org.freedesktop.DBus.Error.UnknownMethod", "no method"),
]


@pytest.fixture(scope="module")
def served(run: Path) -> Iterator[tuple[Daemon, Client]]:
    """One daemon (on a bus of its own) answers every bad call in turn: it must keep serving."""
    with private_bus() as b:
        d = Daemon(b, run).start()
        try:
            with client(b.address) as cl:
                yield d, cl
        finally:
            d.close()


@pytest.mark.parametrize(("what", "call", "name", "message"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_is_a_clear_error(served: tuple[Daemon, Client], bad_images: dict[str, Path], what: str,
                                    call: tuple[str, str, list[Any]], name: str, message: str) -> None:
    daemon, c = served
    member, signature, body = call
    args = [_fill(x, bad_images) for x in body]
    assert message in error(c.manager(member, signature, *args), name)
    assert c.manager("ListMounts").value() == []  # nothing half-made, and the daemon keeps serving
    assert "Traceback" not in daemon.log()


def _fill(value: Any, names: dict[str, Path]) -> Any:
    return value.format(**{k: str(p) for k, p in names.items()}) if isinstance(value, str) else value


def test_a_flood_of_oversized_calls_from_any_user_is_answered(c: Client, daemon: Daemon,
                                                               users: dict[str, tuple[int, int]]) -> None:
    """A user not even in group imgmount: 16 parallel Unmount calls of a 4 MiB object path and 8 Mount
    calls with a 1 MiB image path. Every call is answered with a short error (input echoed at most 200
    characters), and the daemon stays on the bus (dbus-fast's writer used to drop it on EAGAIN)."""
    out = subprocess.run([*as_user(*users["bin"]), sys.executable, "-m", "tests.support.flood", c.address],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    replies = json.loads(out.stdout)
    assert len(replies) == 24
    busy = ERROR_PREFIX + "Busy"  # over the calls in flight one uid may have
    assert {name for name, _ in replies[:16]} <= {ERROR_PREFIX + "NotFound", busy}
    assert {name for name, _ in replies[16:]} <= {ERROR_PREFIX + "NotAuthorized", busy}  # asked before anything
    assert max(length for _, length in replies) < 400
    assert c.manager("ListMounts").value() == []
    assert "lost the bus connection" not in daemon.log()


def test_one_user_has_at_most_16_calls_in_flight(c: Client, daemon: Daemon, users: dict[str, tuple[int, int]],
                                                 group: int, files: dict[str, Path]) -> None:
    """A member sends 48 Inspect calls at once: 16 are served (each runs an opener and a qemu-img of hers),
    the rest are answered Busy at once instead of queueing work; root is served meanwhile."""
    flood = subprocess.Popen([*as_user(*users["daemon"], groups=(group,)), sys.executable, "-m",
                              "tests.support.flood", c.address, str(files["pub"]), "48"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert c.manager("Inspect", "sa{sv}", str(files["pub"]), {}).value()["format"].value == "raw"
    out, err = flood.communicate(timeout=300)
    assert flood.returncode == 0, err[-2000:]
    names = [name for name, _ in json.loads(out)]
    assert len(names) == 48 and set(names) <= {None, ERROR_PREFIX + "Busy"}
    assert names.count(None) >= 16 and names.count(ERROR_PREFIX + "Busy") >= 1
    assert "calls in flight" in daemon.log()
    assert c.manager("ListMounts").value() == []


def test_one_volume_named_many_times_is_mounted_once(c: Client, guest: Guest) -> None:
    disk = v("as", ["disk"] * 256)
    path = c.mount(guest.raw, volumes=disk).value()
    assert [name for name, *_ in c.prop(path, MOUNT_IFACE, "Volumes")] == ["disk"]
    assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value() is None
    assert "at most 256 volumes" in error(c.mount(guest.raw, volumes=v("as", ["disk"] * 1000)), "InvalidArgument")
    assert c.manager("ListMounts").value() == []


def test_200_fds_are_closed_and_refused(c: Client, daemon: Daemon, guest: Guest) -> None:
    before = daemon.fd_count()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(200)]
    try:
        for member, signature, body in (("ListMounts", "", []), ("Mount", "sa{sv}", [str(guest.raw), {}])):
            reply = c.call(MANAGER_PATH, MANAGER_IFACE, member, signature, body, fds=fds)
            assert "takes no file descriptors" in error(reply, "InvalidArgument")
        reply = c.call(MANAGER_PATH, PROPS, "Get", "ss", [MANAGER_IFACE, "Version"], fds=fds[:50])
        assert "takes no file descriptors" in error(reply, "InvalidArgument")
    finally:
        for fd in fds:
            os.close(fd)
    assert daemon.fd_count() == before
    assert c.manager("ListMounts").value() == []


def test_in_use_busy_and_incident_errors(bus: Bus, run: Path, guest: Guest) -> None:
    daemon = Daemon(bus, run)
    state = daemon.state
    (state / "mounts").mkdir(parents=True)
    # A state file damaged by hand: a mount layer without a mountpoint. Unmounting it hits a bug path.
    (state / "mounts" / "0badc0ffee00.json").write_text(json.dumps({
        "id": "0badc0ffee00", "image": "/nonexistent.raw", "format": "raw", "read_only": True, "owner": 0,
        "backend": "loop", "options": {}, "state": "mounted",
        "layers": [{"kind": "mount", "volume": "disk", "state": "attached", "identity": {"device": "/dev/x"}}]}))
    daemon.start()
    try:
        with client(bus.address) as c:
            broken = f"{MOUNTS_PATH}/0badc0ffee00"
            assert c.prop(broken, MOUNT_IFACE, "State") == "broken"
            text = error(c.call(broken, MOUNT_IFACE, "Unmount", "a{sv}", [{}]), "Failed")
            incident = text.split("incident ")[1].split(")")[0]
            assert "Traceback" not in text and ".py" not in text and len(incident) == 8
            assert f"incident {incident}" in daemon.log() and "KeyError" in daemon.log()

            path = c.mount(guest.raw).value()
            assert "already mounted read-only" in error(c.mount(guest.raw, **{"read-only": v("b", False)}),
                                                        "InUse")
            holder = subprocess.Popen(["sleep", "600"], cwd=mountpoint(c, path))
            try:
                assert f"pid {holder.pid}" in error(c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]), "Busy")
                assert c.prop(path, MOUNT_IFACE, "State") == "mounted"
            finally:
                holder.kill()
                holder.wait()
            c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value()
    finally:
        (state / "mounts" / "0badc0ffee00.json").unlink()
        daemon.close()


class _Raiser(ApiInterface):
    """Raises the error its caller names: the boundary's mapping for errors no real input can cause here
    (no free device, a timeout)."""

    def __init__(self) -> None:
        super().__init__("io.github.imgmount.Test")

    @api_method("Raise", (("name", "s"),))
    async def raise_(self, caller: Caller, name: str) -> None:
        raise ERRORS[name]("it went wrong") if name in ERRORS else RuntimeError("/secret/path leaked")


def test_every_error_name_maps_to_one_message_and_exit_code() -> None:
    @contextlib.asynccontextmanager
    async def identify(msg: Message) -> AsyncIterator[Caller]:
        yield Caller(msg.sender or "", 0, 1, (0,))

    def handled(name: str) -> Message:
        msg = Message(path="/x", interface="io.github.imgmount.Test", member="Raise", signature="s",
                      body=[name], serial=7, sender=":1.7")
        return asyncio.run(_Raiser().handle(msg, identify))

    for name, cls in ERRORS.items():
        reply = handled(name)
        assert (reply.error_name, reply.body) == (ERROR_PREFIX + name, ["it went wrong"])
        cli_error = _error(ERROR_PREFIX + name, "it went wrong")
        assert (type(cli_error), cli_error.exit_code, cli_error.message) == (cls, cls.exit_code, "it went wrong")
    unexpected = handled("Surprise")
    assert unexpected.error_name == ERROR_PREFIX + "Failed" and "/secret" not in unexpected.body[0]
    assert set(ERRORS) == {"InvalidArgument", "NotFound", "InvalidImage", "Unsupported", "InUse", "Busy",
                           "NoFreeDevice", "NotAuthorized", "Timeout", "Failed"}
    assert _error("org.freedesktop.DBus.Error.AccessDenied", "x").exit_code == 9
    assert _error("org.freedesktop.DBus.Error.NoReply", "x").exit_code == 10
    assert isinstance(_error("org.freedesktop.DBus.Error.Spawn.ChildExited", "x"), MountdError)


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


# --- authorization ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users() -> dict[str, tuple[int, int]]:
    """Three existing unprivileged accounts (polkit rules name users): uid and primary gid."""
    return {name: (pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid) for name in ("daemon", "bin", "sys")}


@pytest.fixture(scope="module")
def files(shared: Path, guest: Guest, users: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """pub: root's, readable by all; secret: root's only; mine: daemon's own; over: daemon's overlay on
    secret; media: root's directory for mount-root."""
    uid, gid = users["daemon"]
    auth = shared / "auth"
    auth.mkdir()
    out = {"pub": copy(guest.raw, auth / "pub.raw"), "secret": copy(guest.raw, auth / "secret.raw"),
           "mine": copy(guest.raw, auth / "mine.raw"), "over": auth / "over.qcow2"}
    out["secret"].chmod(0o600)
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(out["secret"]), "-F", "raw",
                str(out["over"])])
    for own in (out["mine"], out["over"]):
        os.chown(own, uid, gid)
        own.chmod(0o600)
    out["media"] = auth / "media"
    out["media"].mkdir()
    return out


RW = {"read-only": ("b", False)}


def test_group_fallback_without_polkit(c: Client, other: Callable[..., OtherUser],
                                       users: dict[str, tuple[int, int]], group: int, files: dict[str, Path]) -> None:
    member = other(*users["daemon"], groups=(group,))
    outsider = other(*users["bin"])
    uid = users["daemon"][0]
    assert "only root and members of group imgmount" in error(outsider.mount(files["pub"]), "NotAuthorized")
    error(outsider.inspect(files["pub"]), "NotAuthorized")
    assert f"cannot open {files['secret']} for reading" in error(member.mount(files["secret"]), "NotAuthorized")
    assert f"cannot open {files['secret']} for reading" in error(member.mount(files["over"]), "NotAuthorized")
    assert f"cannot open {files['pub']} for writing" in error(member.mount(files["pub"], **RW), "NotAuthorized")
    assert "only root may choose the mount root" in error(
        member.mount(files["pub"], **{"mount-root": ("s", str(files["media"]))}), "NotAuthorized")
    assert member.inspect(files["pub"]).value()["format"] == "raw"

    mine = member.mount(files["mine"], **RW).value()
    props = c.props(mine, MOUNT_IFACE)
    assert (props["Owner"], props["ReadOnly"]) == (uid, False)
    assert props["Volumes"][0][3] == "/run/media/daemon/mine"
    assert outsider.call(MANAGER_PATH, MANAGER_IFACE, "ListMounts").value() == [mine]  # listing is public
    pub = member.mount(files["pub"]).value()
    assert "unmount other users' mounts" in error(other(*users["bin"], groups=(group,)).unmount(mine),
                                                  "NotAuthorized")
    assert member.unmount(mine).value() is None
    assert c.manager("Unmount", "oa{sv}", pub, {}).value() is None  # root may unmount anyone's
    assert c.manager("ListMounts").value() == []


def test_a_callers_image_is_parsed_by_a_qemu_running_as_the_caller(
        c: Client, daemon: Daemon, other: Callable[..., OtherUser], users: dict[str, tuple[int, int]],
        group: int, files: dict[str, Path], guest: Guest) -> None:
    """A group member's qcow2 overlay on a public raw image, through the FUSE backend: the QEMU that opens
    and parses it runs with her uid, no capabilities and no_new_privs; root's side only reads its NBD; the
    files inside have the right bytes, read and written; a SIGKILL of the daemon loses nothing (her server
    outlives it and a restart adopts the mount); unmount stops her server."""
    uid, gid = users["daemon"]
    member = other(uid, gid, groups=(group,))
    top = files["pub"].parent / "member-overlay.qcow2"
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "pub.raw", "-F", "raw", str(top)])
    os.chown(top, uid, gid)
    top.chmod(0o600)
    assert member.inspect(top).value()["chain"][1]["path"] == str(files["pub"])
    with running_vm(f"file={top},format=qcow2") as vm:
        assert f"qemu-system-x86_64, pid {vm.pid}" in error(member.mount(top, backend=("s", "fuse")), "InUse")
    # What the daemon has, its children inherit; hers is reset (raised here: lowering it, as the installed
    # unit does to -500, needs CAP_SYS_RESOURCE, which this machine may not give even to root).
    Path(f"/proc/{daemon.pid}/oom_score_adj").write_text("500")
    path = member.mount(top, backend=("s", "fuse"), **RW).value()
    try:
        props = c.props(path, MOUNT_IFACE)
        assert (props["Image"], props["Backend"]) == (str(top), "fuse")
        assert props["Device"].endswith(".raw")  # root's FUSE export, not her server's socket
        (server,) = servers_of(uid)
        assert (server["NoNewPrivs"], server["CapEff"], server["CapBnd"]) == ("1", "0" * 16, "0" * 16)
        assert Path(f"/proc/{server['Pid']}/oom_score_adj").read_text().strip() == "0"  # not the daemon's
        assert server["Gid"].split()[0] == str(gid) and str(group) in server["Groups"].split()
        where = mountpoint(c, path)
        guests.check_files(where, guest.files["disk"])
        (where / "mine.txt").write_bytes(b"hers")
        assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        daemon.start()
        assert c.prop(path, MOUNT_IFACE, "State") == "mounted"
        assert (where / "mine.txt").read_bytes() == b"hers"
    finally:
        assert member.unmount(path).value() is None
    assert servers_of(uid) == []
    path = member.mount(top, backend=("s", "fuse")).value()
    assert (mountpoint(c, path) / "mine.txt").read_bytes() == b"hers"
    assert member.unmount(path).value() is None
    top.unlink()


def test_nobody_else_sees_inside_a_users_mounts(c: Client, other: Callable[..., OtherUser],
                                                users: dict[str, tuple[int, int]], group: int,
                                                files: dict[str, Path], guest: Guest) -> None:
    """/run/media/<user> is root's, 0750, with an ACL entry for the user alone: another user (in the same
    group) and nobody can neither list it nor read a file inside the mounted filesystem; the owner can."""
    uid, gid = users["daemon"]
    path = other(uid, gid, groups=(group,)).mount(files["mine"]).value()
    try:
        where = mountpoint(c, path)
        name, data = next(iter(guest.files["disk"].items()))
        assert where.parent == Path("/run/media/daemon")
        nobody = pwd.getpwnam("nobody")
        for who in ((*users["bin"], (group,)), (nobody.pw_uid, nobody.pw_gid, ())):
            for argv in (["ls", str(where.parent)], ["ls", str(where)], ["cat", str(where / name)]):
                out = subprocess.run([*as_user(*who), *argv], capture_output=True, text=True, check=False)
                assert out.returncode != 0 and "Permission denied" in out.stderr, (who, argv, out)
        out = subprocess.run([*as_user(uid, gid, (group,)), "cat", str(where / name)], capture_output=True,
                             check=True)
        assert out.stdout == data
    finally:
        assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value() is None


POLKIT_RULES = """
polkit.addRule(function(action, subject) {
    if (action.id.indexOf("io.github.imgmount.") != 0) {
        return polkit.Result.NOT_HANDLED;
    }
    if (subject.user == "daemon" && action.id != "io.github.imgmount.unmount-others") {
        return polkit.Result.YES;
    }
    if (subject.user == "sys" && action.id == "io.github.imgmount.unmount-others") {
        return polkit.Result.YES;
    }
    return polkit.Result.NO;
});
"""


def test_polkit_decides_where_polkitd_runs(bus: Bus, c: Client, other: Callable[..., OtherUser],
                                           users: dict[str, tuple[int, int]], group: int, files: dict[str, Path]) -> None:
    allowed = other(*users["daemon"])  # no group: polkit alone decides
    refused = other(*users["bin"], groups=(group,))  # the group does not matter where polkit runs
    janitor = other(*users["sys"])
    with polkitd(bus, POLKIT_RULES):
        assert "polkit does not allow" in error(refused.mount(files["pub"]), "NotAuthorized")
        assert f"cannot open {files['secret']}" in error(allowed.mount(files["secret"]), "NotAuthorized")
        mine = allowed.mount(files["mine"], **RW).value()
        pub = allowed.mount(files["pub"]).value()
        assert "polkit does not allow" in error(refused.unmount(mine), "NotAuthorized")
        assert "polkit does not allow" in error(janitor.mount(files["pub"]), "NotAuthorized")
        assert janitor.unmount(mine).value() is None
        assert allowed.unmount(pub).value() is None
    assert c.manager("ListMounts").value() == []


# --- life cycle -------------------------------------------------------------------------------------------


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


def _wait_gone(pid: int) -> None:
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], 30)[0], f"process {pid} did not exit"
    finally:
        os.close(fd)


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
            paths = sorted(c.manager("ListMounts").value())
        assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        daemon.start()
        with client(bus.address) as c:
            assert sorted(c.manager("ListMounts").value()) == paths
            assert {c.prop(p, MOUNT_IFACE, "State") for p in paths} == {"mounted"}
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
    _wait_gone(pid)
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
    engine = Engine(Journal(str(tmp_path / "check")))
    for image, data in written.items():
        if image.suffix == ".qcow2":
            images.run(["qemu-img", "check", "-q", str(image)])
        info = engine.mount(MountRequest(image=str(image), mount_root=str(tmp_path / "media")))
        try:
            assert (Path(info.volumes[0].mountpoint) / "written.bin").read_bytes() == data
        finally:
            engine.unmount(info.id)


# --- the commands -----------------------------------------------------------------------------------------


def _command(bus_address: str, *argv: str, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: x for k, x in os.environ.items() if k != "IMGMOUNT_STATE_DIR"}
    env["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address
    return subprocess.run([*(user or []), str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=env, check=False, timeout=120)


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
        _wait_gone(pid)
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
