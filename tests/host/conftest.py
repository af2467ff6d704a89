"""Fixtures of the host lane's daemon tests: a private bus, a state tmpfs, the real imgmountd, a client, and
the images and accounts the daemon tests (test_daemon_*.py) share."""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.bus import Bus, private_bus, world_dir
from imgmount_testkit.client import Client, client
from imgmount_testkit.daemon import Daemon, tmpfs
from imgmount_testkit.users import OtherUser, imgmount_group
from tests.support import crypt_guests, guests
from tests.support.daemon_calls import copy
from tests.support.guests import Guest


@pytest.fixture(scope="module")
def bus() -> Iterator[Bus]:
    with private_bus() as b:
        yield b


@pytest.fixture(scope="module")
def run() -> Iterator[Path]:
    """Where daemons keep their state: a tmpfs, as /run is."""
    with tmpfs() as path:
        yield path


@pytest.fixture
def daemon(bus: Bus, run: Path) -> Iterator[Daemon]:
    d = Daemon(bus, run).start()
    yield d
    d.close()


@pytest.fixture
def c(bus: Bus, daemon: Daemon) -> Iterator[Client]:
    with client(bus.address) as cl:
        yield cl


@pytest.fixture
def other(bus: Bus) -> Iterator[Callable[..., OtherUser]]:
    """Client processes of other uids, ended after the test."""
    made: list[OtherUser] = []

    def make(uid: int, gid: int, groups: tuple[int, ...] = ()) -> OtherUser:
        made.append(OtherUser(bus, uid, gid, groups))
        return made[-1]

    yield make
    for user in made:
        user.close()


@pytest.fixture(scope="module")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """GPT: p1 ext4, p2 xfs, p3 btrfs, p4 an LVM PV holding guestvg/root (ext4)."""
    return guests.gpt_guest(tmp_path_factory.mktemp("gpt") / "gpt.raw")


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """Images live where other uids may look (pytest's tmp_path is root-only)."""
    path = world_dir("imgmount-daemon-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(shared: Path) -> Guest:
    return guests.whole_disk_guest(shared / "disk.raw")


@pytest.fixture(scope="module")
def luks_qcow2(shared: Path) -> Guest:
    """A qcow2 encrypted by QEMU with LUKS (tests.support.crypt_guests)."""
    return crypt_guests.qemu_encrypted_guest(shared, "luks")


@pytest.fixture(scope="module")
def aes_qcow2(shared: Path) -> Guest:
    return crypt_guests.qemu_encrypted_guest(shared, "aes")


@pytest.fixture(scope="module")
def luks1_disk(shared: Path) -> Guest:
    """GPT: p1 plain ext4, p2 LUKS1 holding ext4."""
    return crypt_guests.luks1_partition_guest(shared)


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


@pytest.fixture(scope="module")
def group() -> Iterator[int]:
    """The group ``imgmount`` (created for the module if the host has none, and removed again)."""
    with imgmount_group() as gid:
        yield gid


@pytest.fixture(scope="module", autouse=True)
def media_cleanup() -> Iterator[None]:
    """Mounts without a mount root go under /run/media/<user>, which the engine leaves in place (like
    udisks): remove the ones a module made, once empty."""
    media = Path("/run/media")
    before = {p.name for p in media.iterdir()} if media.is_dir() else None
    yield
    if not media.is_dir():
        return
    for root in media.iterdir():
        if root.name not in (before or set()) and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    if before is None and not any(media.iterdir()):
        media.rmdir()
