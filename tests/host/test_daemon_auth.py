"""imgmountd's authorization for real: callers of other uids (setpriv), the group fallback where no polkitd
runs, a real polkitd with rules, a caller's image parsed by a QEMU of her own."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from imgmount_testkit import images
from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.polkit import polkitd
from imgmount_testkit.users import OtherUser, as_user, servers_of
from mountd.service.dbusapi import MANAGER_IFACE, MANAGER_PATH, MOUNT_IFACE
from tests.support import guests
from tests.support.daemon_calls import error, mountpoint
from tests.support.guests import Guest
from tests.support.vms import running_vm

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
        as_owner = subprocess.run([*as_user(uid, gid, (group,)), "cat", str(where / name)], capture_output=True,
                                  check=True)
        assert as_owner.stdout == data
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
