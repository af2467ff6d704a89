"""Issue 9, as the attacker and the unlucky user meet it: many callers at once, a mount stuck in its attach,
crashes of the daemon at every step, a shutdown with a mount in use, and images known by what they are
rather than by their names. A real daemon on a private bus, real loop devices, QEMU and filesystems."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dbus_fast import Variant

from imgmount_testkit import images
from imgmount_testkit.bus import REPO, Bus, world_dir
from imgmount_testkit.client import Client, call_message, client, reply_of
from imgmount_testkit.daemon import BIN, Daemon
from imgmount_testkit.users import OtherUser, as_user, servers_of
from mountd.service.dbusapi import ERROR_PREFIX, MANAGER_IFACE, MANAGER_PATH, MOUNT_IFACE
from tests.support import guests, leftovers
from tests.support.attacker import Inotify
from tests.support.engines import first_volume
from tests.support.guests import Guest

IN_MOVED_TO, IN_DELETE = 0x80, 0x200
T = TypeVar("T")
ROUNDS = 30
DIFFERENT, SAME = 16, 8


def v(sig: str, value: Any) -> Variant:
    return Variant(sig, value)


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    return guests.whole_disk_guest(tmp_path_factory.mktemp("robust") / "disk.raw")


def mounts_of(c: Client) -> list[str]:
    return list(c.manager("ListMounts").value())


def mountpoint(c: Client, path: str) -> Path:
    return Path(c.prop(path, MOUNT_IFACE, "Volumes")[0][3])


# --- many callers at once ---------------------------------------------------------------------------------


def _calls(c: Client, messages: list[Any]) -> list[Any]:
    async def all_of() -> list[Any]:
        return list(await asyncio.gather(*(c.bus.call(m) for m in messages)))

    return [reply_of(r) for r in c.loop.run_until_complete(asyncio.wait_for(all_of(), 600))]


def sparse_copy(src: Path, dst: Path) -> Path:
    images.run(["cp", "--sparse=always", str(src), str(dst)])
    return dst


def _round(c: Client, disks: list[Path], shared: Path, previous: set[str]) -> set[str]:
    """Mount 16 images and 8 times one more, while the mounts of the round before come off: all at once."""
    wanted = [*disks, *[shared] * SAME]
    mounts = [call_message(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}", [str(d), {}]) for d in wanted]
    unmounts = [call_message(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]) for path in previous]
    replies = _calls(c, [*mounts, *unmounts])
    assert [r.error for r in replies[len(mounts):]] == [None] * len(unmounts), [r.text for r in replies if r.error]
    paths = [r.value() for r in replies[:len(mounts)]]
    assert len(set(paths[:DIFFERENT])) == DIFFERENT and set(paths[DIFFERENT:]) == {paths[-1]}
    for disk, path in zip(wanted, paths, strict=True):
        assert c.prop(path, MOUNT_IFACE, "Image") == str(disk)
    return set(paths)


def test_16_images_and_8_callers_of_one_image_for_30_rounds(c: Client, daemon: Daemon, guest: Guest,
                                                            tmp_path: Path) -> None:
    """Each round: 16 Mount calls of 16 images and 8 of one more image, while the 17 mounts of the round
    before (other images) come off, all at once. Every call is answered right (the 8 get one mount), the
    files are there, and nothing is left. Without the global lock, loop devices that one detach had freed and
    another mount had taken at once used to be reported busy "open by python3.11" (the detach took the new
    user for a late opener of its own)."""
    before = leftovers.snapshot()
    sets = [[sparse_copy(guest.raw, tmp_path / f"s{k}-{i}.raw") for i in range(DIFFERENT + 1)] for k in (0, 1)]
    previous: set[str] = set()
    for n in range(ROUNDS):
        disks = sets[n % 2]
        previous = _round(c, disks[:DIFFERENT], disks[-1], previous)
        for path in previous:
            guests.check_files(mountpoint(c, path), guest.files["disk"])
    replies = _calls(c, [call_message(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]) for path in previous])
    assert [r.error for r in replies] == [None] * len(previous)
    assert mounts_of(c) == []
    assert leftovers.snapshot().new_since(before) == []
    assert "Traceback" not in daemon.log()


# --- a mount stuck in its attach --------------------------------------------------------------------------


def wait_for_record(state: Path, found: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """The first journal record that ``found`` accepts."""
    return wait_for_journal(state, lambda records: next((r for r in records if found(r)), None), timeout)


def wait_for_journal(state: Path, done: Callable[[list[dict[str, Any]]], T | None], timeout: float = 60) -> T:
    """What ``done`` makes of the journal's records once it is not None, read again as each record is
    written (a rename into ``mounts``) or removed: inotify, no polling."""
    mounts = state / "mounts"
    mounts.mkdir(parents=True, exist_ok=True, mode=0o700)
    watch = Inotify()
    watch.add(str(mounts), IN_MOVED_TO | IN_DELETE)
    deadline = time.monotonic() + timeout
    try:
        while (result := done(_records(mounts))) is None:
            left = deadline - time.monotonic()
            assert left > 0, "the journal never became as expected"
            select.select([watch.fd], [], [], left)
            watch.read()
        return result
    finally:
        watch.close()


def _records(mounts: Path) -> list[dict[str, Any]]:
    records = []
    for entry in mounts.glob("*.json"):
        try:
            records.append(json.loads(entry.read_text()))
        except (OSError, ValueError):
            continue
    return records


def layer_pid(record: dict[str, Any], kind: str) -> int | None:
    pid = next((x["identity"].get("pid") for x in record["layers"] if x["kind"] == kind), None)
    return pid if isinstance(pid, int) else None


def test_a_mount_stuck_in_its_attach_holds_up_no_one_and_is_cancelled(
        bus: Bus, run: Path, guest: Guest, tmp_path: Path, group: int) -> None:
    """A member's qcow2 is served by her QEMU; she stops it (SIGSTOP) as soon as it runs. Meanwhile root
    mounts and unmounts another image in normal time; past the deadline her Mount answers Timeout and
    nothing of it is left, her stopped QEMU included."""
    user = pwd.getpwnam("daemon")
    uid, gid = user.pw_uid, user.pw_gid
    shared = world_dir("imgmount-stuck-")
    try:
        mine = images.convert(guest.raw, shared / "hers.qcow2", "qcow2")
        os.chown(mine, uid, gid)
        _stuck_mount_is_cancelled(bus, run, guest, (uid, gid, group), mine, copy(guest.raw, tmp_path / "o.raw"))
    finally:
        shutil.rmtree(shared)


def _stuck_mount_is_cancelled(bus: Bus, run: Path, guest: Guest, who: tuple[int, int, int], mine: Path,
                              other: Path) -> None:
    uid, gid, group = who
    before = leftovers.snapshot()
    daemon = Daemon(bus, run, IMGMOUNT_MOUNT_TIMEOUT="8").start()
    try:
        hers = subprocess.Popen([*as_user(uid, gid, (group,)), str(BIN / "imgmount"), str(mine), "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address})
        record = wait_for_record(daemon.state, lambda r: layer_pid(r, "server") is not None)
        stopped = layer_pid(record, "server")
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        with client(bus.address) as c:
            path = c.mount(other).value()
            guests.check_files(mountpoint(c, path), guest.files["disk"])
            assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None
            assert hers.poll() is None, "her mount finished before the other one: it was not stuck"
            out, err = hers.communicate(timeout=120)
            assert hers.returncode == 10 and "did not complete within 8 s" in err, (out, err)
            assert err.count("\n") == 1
            assert mounts_of(c) == []
        assert servers_of(uid) == []
        assert leftovers.snapshot().new_since(before) == []
    finally:
        daemon.close()


def test_her_stopped_qemu_holds_up_no_other_mount_at_shutdown(
        bus: Bus, run: Path, guest: Guest, tmp_path: Path, other: Callable[..., OtherUser], group: int) -> None:
    """She mounts her qcow2 read-write (served by her QEMU, as her), root writes into it, and she stops
    (SIGSTOP) that QEMU, so the mount cannot flush. Root's read-write mount, made after hers, still comes off
    at SIGTERM with every byte written to it, while hers waits (never lazily); once her QEMU runs again, hers
    comes off too, nothing lost, and the daemon exits cleanly."""
    user = pwd.getpwnam("daemon")
    shared = world_dir("imgmount-stopped-")
    try:
        mine = images.convert(guest.raw, shared / "hers.qcow2", "qcow2")
        os.chown(mine, user.pw_uid, user.pw_gid)
        written = _shut_down_with_her_qemu_stopped(bus, run, other(user.pw_uid, user.pw_gid, (group,)), mine,
                                                   copy(guest.raw, tmp_path / "root.raw"))
        images.run(["qemu-img", "check", "-q", str(mine)])
        for image, data in written.items():
            with first_volume(image, tmp_path / "check") as inside:
                assert (inside / "written.bin").read_bytes() == data
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _shut_down_with_her_qemu_stopped(bus: Bus, run: Path, she: OtherUser, mine: Path,
                                     theirs: Path) -> dict[Path, bytes]:
    before = leftovers.snapshot()
    daemon = Daemon(bus, run).start()
    try:
        hers = she.mount(mine, **{"read-only": ("b", False)}).value()
        with client(bus.address) as c:
            written = {mine: _unsynced(mountpoint(c, hers)),
                       theirs: _unsynced(mountpoint(c, c.mount(theirs, **{"read-only": v("b", False)}).value()))}
        server = layer_pid(wait_for_record(daemon.state, lambda r: r["image"] == str(mine)), "server")
        assert server is not None
        os.kill(server, signal.SIGSTOP)
        try:  # her own Unmount is stuck in flight: the daemon's stop must not wait for it before the others
            unmount = subprocess.Popen([*as_user(she.uid, she.gid, she.groups), str(BIN / "imgumount"), str(mine)],
                                       env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wait_for_record(daemon.state, lambda r: r["image"] == str(mine) and r["state"] == "unmounting")
            os.kill(daemon.pid, signal.SIGTERM)
            left = wait_for_journal(daemon.state, lambda records: [r["image"] for r in records]
                                    if len(records) == 1 else None)
            assert left == [str(mine)] and daemon.exit_status is None  # hers still flushing, and the daemon waits
        finally:
            os.kill(server, signal.SIGCONT)
        said = unmount.communicate(timeout=60)[0]
        assert unmount.returncode == 0, said
        assert daemon.wait() == 0 and "lazy" not in daemon.log()
    finally:
        daemon.close()
    assert leftovers.snapshot().new_since(before) == []
    return written


def _unsynced(inside: Path) -> bytes:
    """1 MiB written into a mount and left in the page cache: its unmount must flush it."""
    data = os.urandom(1 << 20)
    (inside / "written.bin").write_bytes(data)
    return data


HOLD_LEASE = """
import fcntl, os, signal, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # told of each break, and keeps the lease for lease-break-time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, 1024, fcntl.F_WRLCK)  # F_SETLEASE: any other open of the file waits for the lease to go
print("leased", flush=True)
sys.stdin.read()
"""


def test_a_lease_on_her_image_stalls_no_one(bus: Bus, c: Client, daemon: Daemon, guest: Guest, tmp_path: Path,
                                            group: int) -> None:
    """She holds a write lease on her image (an open of it would wait 45 s, lease-break-time) and sends 8
    Inspect and Mount calls of it at once: each is answered InUse at once (the daemon opens her files
    non-blocking), and root mounts and unmounts another image meanwhile in normal time (the client gives up
    after 20 s)."""
    user = pwd.getpwnam("daemon")
    shared = world_dir("imgmount-lease-")
    try:
        mine = copy(guest.raw, shared / "leased.raw")
        os.chown(mine, user.pw_uid, user.pw_gid)
        who = as_user(user.pw_uid, user.pw_gid, (group,))
        holder = subprocess.Popen([*who, sys.executable, "-c", HOLD_LEASE, str(mine)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "leased\n"
            flood = subprocess.Popen([*who, sys.executable, "-m", "tests.support.flood", c.address, str(mine), "8",
                                      "Inspect,Mount"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            path = c.mount(copy(guest.raw, tmp_path / "other.raw")).value()
            assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None
            out, err = flood.communicate(timeout=120)
            assert flood.returncode == 0, err
            assert [name for name, _ in json.loads(out)] == [ERROR_PREFIX + "InUse"] * 8
            assert holder.poll() is None  # her lease was never broken by a wait of ours
        finally:
            holder.kill()
            holder.wait()
        assert "a program holds a lease on it" in daemon.log()
    finally:
        shutil.rmtree(shared)


# --- crashes ----------------------------------------------------------------------------------------------


def _mount_until_killed(daemon: Daemon, c: Client, image: Path) -> None:
    reply = c.run(c.bus.call(call_message(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}",
                                          [str(image), {"backend": v("s", "fuse")}])))
    assert daemon.proc is not None
    daemon.proc.wait(timeout=60)
    daemon.proc = None
    assert reply_of(reply).error == "org.freedesktop.DBus.Error.NoReply"


@pytest.fixture(scope="module")
def gpt_qcow2(gpt: Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images.convert(gpt.raw, tmp_path_factory.mktemp("crash") / "gpt.qcow2", "qcow2")


STEPS = 18  # before and after each of 9 layers: the FUSE export, 4 loop devices, 4 mounts


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_a_daemon_killed_at_any_step_of_a_mount_leaves_nothing_after_its_restart(
        bus: Bus, run: Path, gpt_qcow2: Path, step: int) -> None:
    """SIGKILL at the N-th step of the attach (QEMU's FUSE export, loop devices, mounts of four volumes):
    the restarted daemon, before it takes its name, tears down what the dead one left, and no device mark
    outlives its record."""
    before = leftovers.snapshot()
    daemon = Daemon(bus, run, IMGMOUNT_CRASH_AT=str(step)).start()
    try:
        with client(bus.address) as c:
            _mount_until_killed(daemon, c, gpt_qcow2)
        daemon.extra_env = {}
        daemon.start()  # on the same state
        with client(bus.address) as c:
            assert mounts_of(c) == []
        assert leftovers.snapshot().new_since(before) == []
        claimed = daemon.state / "claimed"
        assert not claimed.exists() or list(claimed.iterdir()) == []
    finally:
        daemon.close()


@pytest.mark.parametrize("delay_ms", [20, 60, 120, 200, 300])
def test_a_daemon_killed_at_any_moment_of_a_mount_leaves_one_whole_mount_or_nothing(
        bus: Bus, run: Path, gpt_qcow2: Path, gpt: Guest, delay_ms: int) -> None:
    before = leftovers.snapshot()
    daemon = Daemon(bus, run).start()
    try:
        with client(bus.address) as c:
            pending = c.loop.create_task(c.bus.call(call_message(
                MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}", [str(gpt_qcow2), {"backend": v("s", "fuse")}])))
            c.loop.run_until_complete(asyncio.sleep(delay_ms / 1000))  # the moment of the crash, not a wait
            daemon.signal(signal.SIGKILL)
            c.loop.run_until_complete(asyncio.wait_for(pending, 60))
        daemon.start()
        with client(bus.address) as c:
            for path in mounts_of(c):  # a mount that was whole when the daemon died is adopted, whole
                assert c.prop(path, MOUNT_IFACE, "State") == "mounted"
                for name, _dev, _fs, mnt in c.prop(path, MOUNT_IFACE, "Volumes"):
                    guests.check_files(Path(mnt), gpt.files[name])
                assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None
        assert leftovers.snapshot().new_since(before) == []
    finally:
        daemon.close()


def test_sigterm_leaves_a_mount_in_use_whole_for_the_next_start(bus: Bus, run: Path, guest: Guest,
                                                                 tmp_path: Path) -> None:
    """A shell sits in a read-write mount: SIGTERM unmounts what it can, leaves that stack whole (no lazy
    unmount, its QEMU still serving it) and says so; the next start adopts it; once the shell is gone it
    unmounts, and no QEMU outlives it."""
    image = images.convert(guest.raw, tmp_path / "busy.qcow2", "qcow2")
    before = leftovers.snapshot()
    daemon = Daemon(bus, run).start()
    shell = None
    try:
        with client(bus.address) as c:
            path = c.mount(image, **{"read-only": v("b", False), "backend": v("s", "fuse")}).value()
            inside = mountpoint(c, path)
            shell = subprocess.Popen(["sh", "-c", "echo kept > note; exec cat"], cwd=inside,
                                     stdin=subprocess.PIPE)
        assert daemon.signal(signal.SIGTERM) == 1
        assert f"left mount {path.rsplit('/', 1)[1]} of {image} in place" in daemon.log()
        assert "lazily unmounting" not in daemon.log()
        daemon.start()
        with client(bus.address) as c:
            assert mounts_of(c) == [path] and c.prop(path, MOUNT_IFACE, "State") == "mounted"
            assert "busy" in c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).text
            shell.communicate(timeout=30)
            assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None
        assert leftovers.snapshot().new_since(before) == []
    finally:
        if shell is not None and shell.poll() is None:
            shell.kill()
        daemon.close()


# --- identity, not names ----------------------------------------------------------------------------------


def test_another_file_at_the_same_path_is_another_image(c: Client, guest: Guest, tmp_path: Path) -> None:
    first = copy(guest.raw, tmp_path / "disk.raw")
    old = c.mount(first).value()
    replacement = guests.whole_disk_guest(tmp_path / "new.raw", "xfs")
    os.rename(replacement.raw, first)  # the old file lives on, mounted, unnamed
    new = c.mount(first).value()
    assert new != old
    assert c.prop(new, MOUNT_IFACE, "Volumes")[0][2] == "xfs" and c.prop(old, MOUNT_IFACE, "Volumes")[0][2] == "ext4"
    assert c.mount(first).value() == new  # the same file again: the same mount
    for path in (old, new):
        assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None


def test_imgumount_finds_a_renamed_image(bus: Bus, c: Client, guest: Guest, tmp_path: Path) -> None:
    """By the relative name it was mounted under (now gone), and by its new name (the same file)."""
    env = {k: x for k, x in os.environ.items() if k != "IMGMOUNT_STATE_DIR"}
    env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address

    def command(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env,
                              cwd=tmp_path, check=False, timeout=120)

    copy(guest.raw, tmp_path / "a.raw")
    assert command("imgmount", "a.raw").returncode == 0
    os.rename(tmp_path / "a.raw", tmp_path / "b.raw")
    gone = command("imgumount", "a.raw")
    assert gone.returncode == 0, gone.stderr
    assert command("imgmount", "b.raw").returncode == 0
    os.rename(tmp_path / "b.raw", tmp_path / "c.raw")
    found = command("imgumount", "c.raw")
    assert found.returncode == 0, found.stderr
    assert mounts_of(c) == []
