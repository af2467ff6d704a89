"""imgmountd given bad input for real: bad images and options, floods of oversized calls, too many calls from
one uid, too many fds, and the fixed list of error names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from imgmount_testkit import images
from imgmount_testkit.bus import REPO, Bus
from imgmount_testkit.client import Client, client
from imgmount_testkit.daemon import Daemon, serving
from imgmount_testkit.users import as_user
from mountd.service.dbusapi import (
    ERROR_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    MOUNT_IFACE,
    MOUNTS_PATH,
)
from tests.support.daemon_calls import PROPS, error, mountpoint, qcow2, v
from tests.support.guests import Guest


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
    with serving(run) as (_, daemon, cl):
        yield daemon, cl


@pytest.mark.parametrize(("what", "call", "name", "message"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_is_a_clear_error(served: tuple[Daemon, Client], bad_images: dict[str, Path], what: str,
                                    call: tuple[str, str, list[Any]], name: str, message: str) -> None:
    """... and each refusal is logged once, at INFO, with its error name."""
    daemon, c = served
    member, signature, body = call
    args = [_fill(x, bad_images) for x in body]
    logged = _refusals(daemon, member)
    assert message in error(c.manager(member, signature, *args), name)
    assert _refusals(daemon, member) == [*logged, name.rsplit(".", 1)[-1]]
    assert c.manager("ListMounts").value() == []  # nothing half-made, and the daemon keeps serving
    assert "Traceback" not in daemon.log()


def _refusals(daemon: Daemon, member: str) -> list[str]:
    """The error names of the refusals of ``member`` that the daemon logged at INFO."""
    pattern = re.compile(rf"^INFO [\w.]+: {member} from :[0-9.]+: (\w+): ")
    return [m.group(1) for m in map(pattern.search, daemon.log().splitlines()) if m]


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
        for member, signature, body in (("ListMounts", "", []), ("Mount", "sa{sv}", [str(guest.raw), {}]),
                                        ("Inspect", "sa{sv}", [str(guest.raw), {}])):
            reply = c.call(MANAGER_PATH, MANAGER_IFACE, member, signature, body, fds=fds)
            assert "takes no file descriptors" in error(reply, "InvalidArgument")
        reply = c.call(MANAGER_PATH, PROPS, "Get", "ss", [MANAGER_IFACE, "Version"], fds=fds[:50])
        assert "takes no file descriptors" in error(reply, "InvalidArgument")
    finally:
        for fd in fds:
            os.close(fd)
    assert daemon.fd_count() == before
    assert c.manager("ListMounts").value() == []


#: FAKE: a bug in the daemon's unmount path. No input causes one for real (every failure we know of is an
#: error of its class), so it is planted at the daemon's start (a sitecustomize on its PYTHONPATH).
PLANTED_BUG = """
import mountd.engine.engine
def unmount(self, *args, **kwargs):
    raise KeyError("planted by the test")
mountd.engine.engine.Engine.unmount = unmount
"""


def test_an_unexpected_exception_is_an_incident_and_the_daemon_serves_on(bus: Bus, run: Path, guest: Guest,
                                                                        tmp_path: Path) -> None:
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "sitecustomize.py").write_text(PLANTED_BUG)
    daemon = Daemon(bus, run, PYTHONPATH=str(tmp_path / "planted")).start()
    try:
        with client(bus.address) as c:
            path = c.mount(guest.raw).value()
            text = error(c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]), "Failed")
            incident = text.split("incident ")[1].split(")")[0]
            assert "Traceback" not in text and ".py" not in text and "planted" not in text and len(incident) == 8
            assert f"incident {incident}" in daemon.log() and "KeyError: 'planted by the test'" in daemon.log()
            assert c.prop(path, MOUNT_IFACE, "State") == "mounted"
    finally:
        daemon.close()  # its own unmount at SIGTERM meets the planted bug too: close() undoes what is left


def test_in_use_busy_and_damaged_record_errors(bus: Bus, run: Path, guest: Guest) -> None:
    daemon = Daemon(bus, run)
    state = daemon.state
    (state / "mounts").mkdir(parents=True)
    # A state file damaged by hand: a mount layer with only a device. It is shown broken, and unmounting it
    # says the record is damaged and what it names.
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
            assert text.startswith("the journal's record of mount 0badc0ffee00 is damaged (mount options None ")
            assert text.endswith("(still in place: mount {'device': '/dev/x'})") and "Traceback" not in daemon.log()

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
