"""File names that are not UTF-8 (issue 9 item 8). D-Bus strings must be UTF-8; a file name need not be.

- The command refuses, in one sentence saying why and what to do, to send such a path to the daemon; the
  in-process engine mounts it.
- The daemon names an image by what the kernel says of the descriptor it opened, so a UTF-8 symlink into a
  directory whose name is not UTF-8 gives it such a name: every reply shows it as ``\\xNN`` (properties,
  Inspect, errors), while the journal keeps the real bytes (a restarted daemon adopts the mount).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import Variant

from imgmount_testkit import images
from imgmount_testkit.bus import Bus, world_dir
from imgmount_testkit.client import Client, client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import OtherUser, as_user
from mountd.errors import InvalidArgumentError
from mountd.service.dbusapi import ERROR_PREFIX, MOUNT_IFACE
from tests.support import guests, leftovers

BIN = Path(sys.executable).parent
CONTENT = guests.whole_disk_guest  # what each image holds: one ext4 with guests' "disk" files
FORMATS = ("qcow2", "raw")
#: Both backends: the loop backend reads the kernel's backing_file name as bytes, so a raw image whose real
#: name is not UTF-8 is seen to have a size and comes off again.
BACKENDS = [pytest.param("qcow2", id="fuse"), pytest.param("raw", id="loop")]


@dataclass(frozen=True)
class Names:
    """Each image as qcow2 (FUSE backend) and raw (loop backend), in a world-searchable UTF-8 directory."""

    base: Path
    files: dict[str, bytes]

    def bad_file(self, fmt: str) -> bytes:
        """base/\\xff.FMT: a file whose own name is not UTF-8."""
        return os.fsencode(self.base) + b"/\xff." + fmt.encode()

    def real(self, fmt: str) -> bytes:
        """base/\\xff/disk.FMT: in a directory whose name is not UTF-8."""
        return os.fsencode(self.base) + b"/\xff/disk." + fmt.encode()

    def link(self, fmt: str) -> Path:
        """base/link.FMT -> base/\\xff/disk.FMT: a UTF-8 name for it."""
        return self.base / f"link.{fmt}"

    @staticmethod
    def shown(path: bytes) -> str:
        """How imgmount shows a name: each byte that is not UTF-8 as \\xNN."""
        return path.decode("utf-8", "backslashreplace")


@pytest.fixture(scope="module")
def names() -> Iterator[Names]:
    base = world_dir("imgmount-names-")
    guest = CONTENT(base / "guest.raw")
    found = Names(base, dict(guest.files["disk"]))
    os.mkdir(os.fsencode(base) + b"/\xff", 0o755)
    for fmt in FORMATS:
        for path in (found.bad_file(fmt), found.real(fmt)):
            if fmt == "raw":
                shutil.copyfile(guest.raw, path)
            else:
                images.convert(guest.raw, Path(os.fsdecode(path)), fmt)
            os.chmod(path, 0o644)
        os.symlink(found.real(fmt), found.link(fmt))
    yield found
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def member(group: int) -> tuple[int, int, tuple[int, ...]]:
    """An unprivileged user in group imgmount (no polkitd runs here): uid, gid, groups."""
    user = pwd.getpwnam("daemon")
    return user.pw_uid, user.pw_gid, (group,)


@pytest.fixture
def clean() -> Iterator[None]:
    before = leftovers.snapshot()
    yield
    assert leftovers.snapshot().new_since(before) == []


def command(*argv: str | bytes, bus: Bus | None = None, state: Path | None = None,
            user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: through the daemon on ``bus``, or in-process with ``state``."""
    env = {k: x for k, x in os.environ.items() if k != "IMGMOUNT_STATE_DIR"}
    if bus is not None:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    if state is not None:
        env["IMGMOUNT_STATE_DIR"] = str(state)
    program = str(BIN / str(argv[0]))
    return subprocess.run([*(user or []), program, *argv[1:]], capture_output=True, text=True, env=env,
                          check=False, timeout=120)


def refusal(image: bytes) -> str:
    return (f"imgmount: the image path {Names.shown(image)} is not valid UTF-8, which D-Bus cannot carry to "
            "imgmountd: rename the file, or point a symlink with a UTF-8 name at it\n")


# --- the command ------------------------------------------------------------------------------------------


def test_the_command_says_why_it_cannot_send_a_path_that_is_not_utf8(
        bus: Bus, c: Client, names: Names, member: tuple[int, int, tuple[int, ...]], clean: None) -> None:
    bad = names.bad_file("qcow2")
    for user in (None, as_user(*member)):
        refused = command("imgmount", bad, bus=bus, user=user)
        assert (refused.returncode, refused.stdout) == (InvalidArgumentError.exit_code, "")
        assert refused.stderr == refusal(bad)
    as_json = command("imgmount", bad, "--json", bus=bus)
    assert json.loads(as_json.stdout) == {"error": "InvalidArgument", "message": refusal(bad)[len("imgmount: "):-1]}
    assert c.manager("ListMounts").value() == []
    # What the message advises works: a symlink with a UTF-8 name.
    link = names.base / "advice.qcow2"
    os.symlink(bad, link)
    try:
        mounted = command("imgmount", str(link), "--json", bus=bus)
        assert mounted.returncode == 0, mounted.stderr
        info = json.loads(mounted.stdout)
        assert info["image"] == Names.shown(bad)
        guests.check_files(Path(info["volumes"][0]["mountpoint"]), names.files)
        listed = command("imgmount", "--list", bus=bus)
        assert listed.stdout.startswith(f"{Names.shown(bad)}: qcow2, read-only, via fuse ")
        gone = command("imgumount", str(link), bus=bus)  # found by the file the link names
        assert gone.returncode == 0, gone.stderr
    finally:
        link.unlink()
    assert c.manager("ListMounts").value() == []


@pytest.mark.parametrize("fmt", BACKENDS)
def test_in_process_the_command_mounts_and_shows_such_a_path(names: Names, fmt: str, tmp_path: Path,
                                                             clean: None) -> None:
    bad = names.bad_file(fmt)
    state, shown = tmp_path / "state", Names.shown(bad)
    info = command("imgmount", "--info", bad)
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith(f"{shown}: {fmt}, 64 MiB virtual")
    assert json.loads(command("imgmount", "--info", "--json", bad).stdout)["image"] == shown
    mounted = command("imgmount", bad, "--mount-root", str(tmp_path / "media"), state=state)
    assert mounted.returncode == 0, mounted.stderr
    assert mounted.stdout.startswith(f"{shown}: {fmt}, read-only, via ")
    listed = json.loads(command("imgmount", "--list", "--json", state=state).stdout)
    assert [m["image"] for m in listed] == [shown]
    guests.check_files(Path(listed[0]["volumes"][0]["mountpoint"]), names.files)
    gone = command("imgumount", bad, state=state)  # the name as given, bytes and all
    assert (gone.returncode, gone.stdout) == (0, f"unmounted {shown}\n"), gone.stderr


# --- the daemon -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", BACKENDS)
def test_the_daemon_shows_a_name_that_is_not_utf8_and_keeps_the_real_one(
        bus: Bus, c: Client, daemon: Daemon, names: Names, fmt: str, clean: None) -> None:
    shown = Names.shown(names.real(fmt))
    inspected = c.manager("Inspect", "sa{sv}", str(names.link(fmt)), {}).value()
    assert inspected["image"].value == shown
    assert inspected["chain"].value[0]["path"].value == shown
    path = c.mount(names.link(fmt)).value()
    props = c.props(path, MOUNT_IFACE)
    assert (props["Image"], props["Format"], props["State"]) == (shown, fmt, "mounted")
    [(volume, _, fstype, where)] = props["Volumes"]
    assert (volume, fstype) == ("disk", "ext4")
    guests.check_files(Path(where), names.files)
    # An error naming the image names it the same way (and is an error, not a reply the bus cannot carry).
    refused = c.mount(names.link(fmt), **{"read-only": Variant("b", False)})
    assert refused.error == ERROR_PREFIX + "InUse"
    assert refused.text.startswith(f"{shown} is already mounted read-only by imgmount")
    # The journal holds the real bytes, and a daemon that starts again finds the mount by them.
    record = json.loads((daemon.state / "mounts" / f"{path.rsplit('/', 1)[1]}.json").read_text())
    assert os.fsencode(record["image"]) == names.real(fmt)
    assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()
    with client(bus.address) as again:
        assert again.manager("ListMounts").value() == [path]
        assert again.props(path, MOUNT_IFACE)["Image"] == shown
        assert again.prop(path, MOUNT_IFACE, "State") == "mounted"
        assert again.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None
        assert again.manager("ListMounts").value() == []


def test_a_user_mounts_through_a_utf8_symlink_into_a_directory_that_is_not(
        c: Client, names: Names, other: Callable[..., OtherUser], member: tuple[int, int, tuple[int, ...]],
        clean: None) -> None:
    """Her qcow2 is opened by her opener and parsed by a QEMU of hers: the name is the kernel's all the same."""
    shown = Names.shown(names.real("qcow2"))
    user = other(*member)
    assert user.inspect(names.link("qcow2")).value()["image"] == shown
    path = user.mount(names.link("qcow2")).value()
    props = c.props(path, MOUNT_IFACE)
    assert (props["Image"], props["Owner"]) == (shown, member[0])
    mountpoint = props["Volumes"][0][3]
    files = subprocess.run([*as_user(*member), "cat", f"{mountpoint}/hello.txt"], capture_output=True,
                           check=False)
    assert files.stdout == names.files["hello.txt"]
    assert user.unmount(path).value() is None
    assert c.manager("ListMounts").value() == []
