"""Encrypted images through imgmountd: QEMU-encrypted qcow2 (LUKS, legacy AES) and a LUKS1 partition
(QEMU's luks driver on the FUSE path, this host having no device-mapper), keys given as the Mount options
``passphrases`` and ``key-file`` (an fd). Files read back byte for byte; the secret never in any process's
command line or environment while mounting, nor in the journal or the daemon's (debug) log; a wrong or
missing key is one clear sentence, leaves nothing behind, and the next try works."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client, plain
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import OtherUser
from mountd.service.dbusapi import MANAGER_IFACE, MANAGER_PATH, MOUNT_IFACE
from tests.support import guests, leftovers
from tests.support.bitlocker_guest import RECOVERY, bitlocker_guest
from tests.support.crypt_guests import IMAGE_PASSPHRASE, PASSPHRASE
from tests.support.daemon_calls import copy, error, v
from tests.support.guests import Guest
from tests.support.secret_scan import files_holding, key_memfds, scanning_processes


@pytest.fixture
def daemon(bus: Bus, run: Path) -> Iterator[Daemon]:
    """The daemon of these tests (``c`` talks to it) logs every command line (--debug): checked for keys."""
    d = Daemon(bus, run, debug=True).start()
    yield d
    d.close()


@pytest.fixture
def key_file(tmp_path: Path) -> Callable[[bytes], Path]:
    def make(secret: bytes) -> Path:
        path = tmp_path / "key"
        path.write_bytes(secret)
        return path

    return make


def volumes(c: Client, path: str) -> dict[str, Path]:
    return {name: Path(mnt) for name, _dev, _fs, mnt in c.prop(path, MOUNT_IFACE, "Volumes")}


def check_and_unmount(c: Client, path: str, guest: Guest) -> None:
    found = volumes(c, path)
    assert set(found) == set(guest.files)
    for name, mnt in found.items():
        guests.check_files(mnt, guest.files[name])
    c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value()
    assert not any(m.exists() for m in found.values())


def assert_no_secret_kept(daemon: Daemon, *secrets: bytes) -> None:
    assert files_holding(secrets, [daemon.state, daemon.logfile]) == []


def test_luks_qcow2_with_the_passphrases_option(c: Client, daemon: Daemon, luks_qcow2: Guest) -> None:
    before = leftovers.snapshot()
    with scanning_processes([IMAGE_PASSPHRASE]) as seen:
        path = c.mount(luks_qcow2.raw, passphrases=v("a{ss}", {"image": IMAGE_PASSPHRASE.decode()})).value()
        assert_no_secret_kept(daemon, IMAGE_PASSPHRASE)  # the journal, while mounted
    assert seen == set()
    held = key_memfds()  # the running QEMU servers keep the descriptor they inherited (QEMU closes none)
    assert held and set(held.values()) == {0}, "a key memfd still holds the key"
    check_and_unmount(c, path, luks_qcow2)
    assert leftovers.ours(leftovers.snapshot().new_since(before), luks_qcow2.raw, daemon.state) == []
    assert "imgmount-key" in daemon.log()  # the command lines were logged, and named the secret object only
    assert_no_secret_kept(daemon, IMAGE_PASSPHRASE)


def test_legacy_aes_qcow2_with_a_key_file(c: Client, daemon: Daemon, aes_qcow2: Guest,
                                          key_file: Callable[[bytes], Path]) -> None:
    key = key_file(IMAGE_PASSPHRASE)
    fd = os.open(key, os.O_RDONLY)
    try:
        with scanning_processes([IMAGE_PASSPHRASE]) as seen:
            path = c.call("/io/github/imgmount/Mountd1", "io.github.imgmount.Mountd1.Manager", "Mount", "sa{sv}",
                          [str(aes_qcow2.raw), {"key-file": v("h", 0)}], fds=[fd]).value()
    finally:
        os.close(fd)
    assert seen == set()
    assert daemon.holds(key) == []  # the key file's descriptor was closed after the call
    check_and_unmount(c, path, aes_qcow2)
    assert_no_secret_kept(daemon, IMAGE_PASSPHRASE)


def test_luks1_partition_through_qemus_luks_driver(c: Client, daemon: Daemon, luks1_disk: Guest) -> None:
    before = leftovers.snapshot()
    with scanning_processes([PASSPHRASE]) as seen:
        path = c.mount(luks1_disk.raw, passphrases=v("a{ss}", {"p2": PASSPHRASE.decode()})).value()
    assert seen == set()
    assert {name: fs for name, _dev, fs, _mnt in c.prop(path, MOUNT_IFACE, "Volumes")} == \
        {"p1": "ext4", "p2": "ext4"}
    assert_no_secret_kept(daemon, PASSPHRASE)
    check_and_unmount(c, path, luks1_disk)
    assert leftovers.ours(leftovers.snapshot().new_since(before), luks1_disk.raw, daemon.state) == []


def test_wrong_passphrase_leaves_nothing_and_the_next_try_works(c: Client, daemon: Daemon, luks1_disk: Guest,
                                                                 luks_qcow2: Guest) -> None:
    before = leftovers.snapshot()
    reply = c.mount(luks1_disk.raw, passphrases=v("a{ss}", {"p2": "not it"}))
    assert error(reply, "InvalidArgument") == "wrong passphrase for volume p2"
    reply = c.mount(luks_qcow2.raw, passphrases=v("a{ss}", {"image": "not it"}))
    assert error(reply, "InvalidArgument") == "wrong passphrase for the image"
    left = leftovers.snapshot().new_since(before)
    assert leftovers.ours(left, luks1_disk.raw, luks_qcow2.raw, daemon.state) == []
    assert c.manager("ListMounts").value() == []
    assert list((daemon.state / "exports").iterdir()) == []
    path = c.mount(luks1_disk.raw, passphrases=v("a{ss}", {"p2": PASSPHRASE.decode()})).value()
    check_and_unmount(c, path, luks1_disk)


def test_no_key_names_the_locked_volume_and_how_to_give_one(c: Client, luks1_disk: Guest,
                                                             luks_qcow2: Guest) -> None:
    text = error(c.mount(luks1_disk.raw), "InvalidArgument")
    assert text.startswith("volume p2 is locked (LUKS1): give its passphrase")
    assert "--passphrase-stdin" in text and "passphrases" in text
    text = error(c.mount(luks_qcow2.raw), "InvalidArgument")
    assert "is encrypted by QEMU (luks): give its passphrase" in text
    assert c.manager("ListMounts").value() == []


def test_inspect_looks_inside_a_qemu_encrypted_image_with_its_key(c: Client, daemon: Daemon, luks_qcow2: Guest,
                                                                  key_file: Callable[[bytes], Path]) -> None:
    """Inspect takes the Mount call's keys: without one it says the image is locked and shows nothing in
    it; with the passphrase, or a key file sent as an fd, it shows the filesystem inside; a wrong one is one
    sentence. Nothing stays, and the key is in no file of the daemon's."""
    image = str(luks_qcow2.raw)
    locked = plain(c.manager("Inspect", "sa{sv}", image, {}).value())
    assert (locked["locked"], locked["volumes"]) == ("QEMU luks", [])
    given = c.manager("Inspect", "sa{sv}", image, {"passphrases": v("a{ss}", {"image": IMAGE_PASSPHRASE.decode()})})
    with open(key_file(IMAGE_PASSPHRASE), "rb") as key:
        sent = c.call(MANAGER_PATH, MANAGER_IFACE, "Inspect", "sa{sv}", [image, {"key-file": v("h", 0)}],
                      fds=[key.fileno()])
    for reply in (plain(given.value()), plain(sent.value())):
        assert [(x["name"], x["filesystem"]["type"]) for x in reply["volumes"]] == [("p1", "ext4")]
    wrong = c.manager("Inspect", "sa{sv}", image, {"passphrases": v("a{ss}", {"image": "not it"})})
    assert error(wrong, "InvalidArgument") == "wrong passphrase for the image"
    assert c.manager("ListMounts").value() == []
    assert_no_secret_kept(daemon, IMAGE_PASSPHRASE)


def test_a_users_key_file_is_read_from_her_fd(c: Client, other: Callable[..., OtherUser],
                                             users: dict[str, tuple[int, int]], group: int, shared: Path,
                                             luks_qcow2: Guest) -> None:
    uid, gid = users["daemon"]
    image = copy(luks_qcow2.raw, shared / "hers.qcow2")
    os.chown(image, uid, gid)
    mine, roots = shared / "her.key", shared / "root.key"
    for path, owner in ((mine, uid), (roots, 0)):
        path.write_bytes(IMAGE_PASSPHRASE)
        os.chown(path, owner, gid)
        path.chmod(0o600)
    her = other(uid, gid, groups=(group,))
    assert her.mount(image, [str(roots)], **{"key-file": ("h", 0)}).error == "open"  # she cannot open it
    reply = her.mount(image, **{"key-file": ("h", 0)})  # an index with no fd: nothing is opened for her
    assert "names no file descriptor" in error(reply, "InvalidArgument")
    assert "type h" in error(her.mount(image, **{"key-file": ("s", str(roots))}), "InvalidArgument")
    wrong = her.mount(image, passphrases=("a{ss}", {"image": "not it"}))  # her own QEMU says so
    assert error(wrong, "InvalidArgument") == "wrong passphrase for the image"
    path = her.mount(image, [str(mine)], **{"key-file": ("h", 0)}).value()
    her.unmount(path).value()


def test_the_scan_sees_a_secret_in_a_command_line() -> None:
    """The control of the scans above: a secret in an argument is found."""
    with scanning_processes([b"visible-secret-123"]) as seen:
        subprocess.run(["sh", "-c", "sleep 0.3", "visible-secret-123"], check=True)
    assert seen


@pytest.fixture(scope="module")
def bitlocker_disk(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    return bitlocker_guest(tmp_path_factory.mktemp("bde") / "windows.raw")


def test_a_users_bitlocker_volume_with_its_recovery_password(c: Client, daemon: Daemon, bitlocker_disk: Guest,
                                                            other: Callable[..., OtherUser],
                                                            users: dict[str, tuple[int, int]], group: int,
                                                            shared: Path) -> None:
    """Her Windows disk, its BitLocker volume opened with the recovery password given as ``passphrases``
    (typed to dislocker on a terminal of its own): her files byte for byte, the digits nowhere."""
    uid, gid = users["daemon"]
    image = copy(bitlocker_disk.raw, shared / "windows.raw")
    os.chown(image, uid, gid)
    before = leftovers.snapshot()
    her = other(uid, gid, groups=(group,))
    with scanning_processes([RECOVERY.encode()]) as seen:
        path = her.mount(image, passphrases=("a{ss}", {"p2": RECOVERY})).value()
    assert seen == set()
    assert {name: fs for name, _dev, fs, _mnt in c.prop(path, MOUNT_IFACE, "Volumes")} == \
        {"p1": "ext4", "p2": "ntfs"}
    assert_no_secret_kept(daemon, RECOVERY.encode(), RECOVERY.replace("-", "").encode())
    check_and_unmount(c, path, bitlocker_disk)
    assert leftovers.ours(leftovers.snapshot().new_since(before), image, daemon.state) == []
