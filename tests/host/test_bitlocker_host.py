"""BitLocker on this host (FUSE and loop, no device-mapper needed): a real volume (the test kit's BitLocker
writer, as Windows 10 encrypts a data drive; checked against dislocker and libbde in
test_bitlocker_writer.py) mounts with its password or its recovery password, from a D-Bus key, a key option
or a terminal, and its files read back byte for byte; a wrong key is one sentence; no secret is seen in any
command line; nothing is left.

What no real volume can show uses a STUB: a BitLocker boot sector (Windows 7 signature, "-FVE-FS-") pointing
at an FVE metadata block header, which blkid identifies as BitLocker version 2 and which dislocker reads and
rejects.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.bitlocker import new_recovery_password
from imgmount_testkit.crypt_layouts import LINUX_FS, content
from mountd.engine.engine import Engine
from mountd.engine.inspection import inspect_image
from mountd.engine.unlocking import lock_kind
from mountd.errors import InvalidArgumentError, InvalidImageError, WrongKeyError
from mountd.keys import Keys
from mountd.layers.layer import InjectedFault
from mountd.model import MountRequest
from mountd.settings import Settings
from tests.support import guests, leftovers
from tests.support.bitlocker_guest import PASSWORD as REAL_PASSWORD
from tests.support.bitlocker_guest import RECOVERY, bitlocker_guest
from tests.support.daemon_calls import BIN
from tests.support.engines import engine_in
from tests.support.guests import Guest
from tests.support.secret_scan import scanning_processes
from tests.support.terminal import at_terminal

PASSWORD = b"BitLocker user password 42"
FVE_AT = 64 << 10


def bitlocker_stub(path: Path) -> Path:
    """GPT: p1 ext4 with known files, p2 the BitLocker STUB (see the module docstring)."""
    raw = images.blank(path, 64 * images.MiB)
    images.partition(raw, f"label: gpt\nsize=24MiB, type={LINUX_FS}\ntype=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n")
    (p1, p2) = images.sfdisk_json(raw)["partitions"]
    images.format_region(raw, p1["start"] * 512, p1["size"] * 512, "ext4", files=content("p1"))
    boot = bytearray(512)
    boot[0:11] = b"\xeb\x58\x90-FVE-FS-"
    boot[176:184] = struct.pack("<Q", FVE_AT)
    boot[510:512] = b"\x55\xaa"
    with open(raw, "r+b") as f:
        f.seek(p2["start"] * 512)
        f.write(boot)
        f.seek(p2["start"] * 512 + FVE_AT)
        f.write(b"-FVE-FS-" + struct.pack("<HH", 64, 2))
    return raw


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bitlocker_stub(tmp_path_factory.mktemp("bde") / "windows.raw")


@pytest.fixture(scope="module")
def windows(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    return bitlocker_guest(tmp_path_factory.mktemp("bde-real") / "windows.raw")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with engine_in(tmp_path / "state") as eng:
        yield eng


def test_inspection_shows_bitlocker_locked(stub: Path) -> None:
    p2 = inspect_image(str(stub)).layout.volume("p2")
    assert p2 is not None and lock_kind(p2) == "BitLocker" and p2.signature is not None
    assert p2.signature.version == "2"


def test_a_mount_of_every_volume_asks_for_its_password_and_the_others_mount_when_named(
        engine: Engine, stub: Path, tmp_path: Path) -> None:
    """dislocker's FUSE runs here, so BitLocker is a volume this host unlocks: mounting every volume without
    its password names it (as for LUKS), and leaves nothing; naming the other volume mounts it."""
    before = leftovers.snapshot()
    with pytest.raises(InvalidArgumentError, match=r"^volume p2 is locked \(BitLocker\): give its passphrase"):
        engine.mount(MountRequest(str(stub), mount_root=str(tmp_path / "media")))
    assert engine.mounts() == [] and leftovers.ours(leftovers.snapshot().new_since(before), stub.parent) == []
    info = engine.mount(MountRequest(str(stub), mount_root=str(tmp_path / "media"), volumes=("p1",)))
    assert [v.name for v in info.volumes] == ["p1"]
    guests.check_files(Path(info.volumes[0].mountpoint), content("p1"))
    engine.unmount(info.id)


def test_a_volume_dislocker_rejects_is_one_sentence_and_leaves_nothing(engine: Engine, stub: Path,
                                                                        tmp_path: Path) -> None:
    before = leftovers.snapshot()
    with scanning_processes([PASSWORD]) as seen, pytest.raises(InvalidImageError) as caught:
        engine.mount(MountRequest(str(stub), mount_root=str(tmp_path / "media"), volumes=("p2",),
                                  keys=Keys(everywhere=PASSWORD)))
    assert str(caught.value).startswith("dislocker could not open the BitLocker volume on /dev/loop")
    assert str(caught.value).endswith(": Cannot parse volume header. Abort.")
    assert PASSWORD.decode() not in str(caught.value)
    assert seen == set() and engine.mounts() == []
    assert leftovers.ours(leftovers.snapshot().new_since(before), stub.parent, tmp_path) == []
    assert not any((tmp_path / "state" / "bitlocker").iterdir())


def test_a_recovery_password_reaches_dislocker_through_a_terminal(engine: Engine, stub: Path,
                                                                    tmp_path: Path) -> None:
    """dislocker reads a recovery password only from /dev/tty: it gets a pseudo-terminal with the digits in it,
    reads them (it checks their format before it reads the volume) and then says what it says of the STUB;
    the digits are in no command line, and nothing is left."""
    recovery = b"-".join([b"123453", b"000000", b"720885", b"011011", b"654313", b"111111", b"222222", b"333333"])
    before = leftovers.snapshot()
    with scanning_processes([recovery]) as seen, pytest.raises(InvalidImageError, match="dislocker could not open"):
        engine.mount(MountRequest(str(stub), mount_root=str(tmp_path / "media"), volumes=("p2",),
                                  keys=Keys(everywhere=recovery)))
    assert seen == set() and engine.mounts() == []
    assert leftovers.ours(leftovers.snapshot().new_since(before), stub.parent, tmp_path) == []


def test_naming_it_without_a_password_says_to_give_one(engine: Engine, stub: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^volume p2 is locked \(BitLocker\): give its passphrase"):
        engine.mount(MountRequest(str(stub), mount_root=str(tmp_path / "media"), volumes=("p2",)))
    assert engine.mounts() == []


def test_the_command_asks_for_the_bitlocker_password_on_a_terminal(stub: Path, tmp_path: Path) -> None:
    """A volume this host unlocks is asked for, whatever locks it (not LUKS1 only); what dislocker then says
    of the STUB reaches the user, and nothing is left."""
    env = {**os.environ, "IMGMOUNT_STATE_DIR": str(tmp_path / "state")}
    before = leftovers.snapshot()
    with at_terminal([str(BIN / "imgmount"), str(stub)], env) as term:
        assert term.read_until(b": ").strip().endswith(b"Passphrase for volume p2 (BitLocker):")
        term.type(PASSWORD)
        said = term.read_until(b"Abort.")
        assert term.proc.wait(timeout=120) == InvalidImageError.exit_code
    assert b"dislocker could not open the BitLocker volume" in said and PASSWORD not in said
    assert leftovers.ours(leftovers.snapshot().new_since(before), stub.parent, tmp_path) == []


@pytest.mark.parametrize("secret", [REAL_PASSWORD, RECOVERY, RECOVERY.replace("-", "")],
                         ids=["password", "recovery password", "recovery password without hyphens"])
def test_a_real_volume_mounts_with_its_password_or_its_recovery_password(engine: Engine, windows: Guest,
                                                                        tmp_path: Path, secret: str) -> None:
    """Read-only (the default): dislocker's decrypted file on a loop device, ntfs-3g on it; every file byte for
    byte; the secret in no command line, the journal or the log; after the unmount nothing is left."""
    before = leftovers.snapshot()
    with scanning_processes([secret.encode()]) as seen:
        info = engine.mount(MountRequest(str(windows.raw), mount_root=str(tmp_path / "media"),
                                         keys=Keys(everywhere=secret.encode())))
    volumes = {v.name: v for v in info.volumes}
    assert {name: v.filesystem for name, v in volumes.items()} == {"p1": "ext4", "p2": "ntfs"}
    for name, files in windows.files.items():
        guests.check_files(Path(volumes[name].mountpoint), files)
    assert secret.encode() not in b"".join(p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file())
    engine.unmount(info.id)
    assert seen == set() and engine.mounts() == []
    assert leftovers.ours(leftovers.snapshot().new_since(before), windows.raw.parent, tmp_path) == []
    assert not any((tmp_path / "state" / "bitlocker").iterdir())


@pytest.mark.parametrize("secret", [REAL_PASSWORD[::-1], new_recovery_password(7)],
                         ids=["password", "recovery password"])
def test_a_wrong_key_for_a_real_volume_is_one_sentence_and_the_next_try_works(
        engine: Engine, windows: Guest, tmp_path: Path, secret: str) -> None:
    before = leftovers.snapshot()
    with pytest.raises(WrongKeyError, match=r"^wrong password for volume p2 \(BitLocker on /dev/loop\d+\): "
                                            r"check it and try again$"):
        engine.mount(MountRequest(str(windows.raw), mount_root=str(tmp_path / "media"), volumes=("p2",),
                                  keys=Keys(everywhere=secret.encode())))
    assert engine.mounts() == []
    assert leftovers.ours(leftovers.snapshot().new_since(before), windows.raw.parent, tmp_path) == []
    info = engine.mount(MountRequest(str(windows.raw), mount_root=str(tmp_path / "media"), volumes=("p2",),
                                     keys=Keys(by_volume={"p2": REAL_PASSWORD.encode()})))
    guests.check_files(Path(info.volumes[0].mountpoint), windows.files["p2"])
    engine.unmount(info.id)


def test_the_command_asks_for_a_real_volume_s_recovery_password_on_a_terminal(windows: Guest,
                                                                             tmp_path: Path) -> None:
    """A user who has only the recovery password (the usual case on another machine) types it at the prompt;
    the volume mounts and imgumount takes it down."""
    env = {**os.environ, "IMGMOUNT_STATE_DIR": str(tmp_path / "state")}
    before = leftovers.snapshot()
    with at_terminal([str(BIN / "imgmount"), str(windows.raw), "--volume", "p2",
                      "--mount-root", str(tmp_path / "media")], env) as term:
        assert term.read_until(b": ").strip().endswith(b"Passphrase for volume p2 (BitLocker):")
        term.type(RECOVERY.encode())
        said = term.read_until(b"\n")
        assert term.proc.wait(timeout=180) == 0, said
    assert RECOVERY.encode() not in said
    (mountpoint,) = [p for p in (tmp_path / "media").rglob("*") if p.is_dir() and os.path.ismount(p)]
    guests.check_files(mountpoint, windows.files["p2"])
    subprocess.run([str(BIN / "imgumount"), str(windows.raw)], env=env, check=True, timeout=180)
    assert leftovers.ours(leftovers.snapshot().new_since(before), windows.raw.parent, tmp_path) == []


def test_a_fault_at_each_step_of_a_real_volume_s_mount_leaves_nothing(windows: Guest, tmp_path: Path) -> None:
    """Every step of the stack (the disk's loop device, dislocker's FUSE mount, the loop device on its
    decrypted file, the mount), failed in turn: nothing is left, and after the last step the mount is whole."""
    steps: list[str] = []
    for step in range(1, 20):
        engine = Engine(settings=Settings(state_dir=tmp_path / f"state{step}", fault_at=step))
        before = leftovers.snapshot()
        request = MountRequest(str(windows.raw), mount_root=str(tmp_path / "media"), volumes=("p2",),
                               keys=Keys(everywhere=REAL_PASSWORD.encode()))
        try:
            info = engine.mount(request)
        except InjectedFault as fault:
            steps.append(str(fault).rpartition("(")[2].rstrip(")"))
            assert engine.mounts() == [], fault
            assert leftovers.ours(leftovers.snapshot().new_since(before), windows.raw.parent, tmp_path) == []
            continue
        guests.check_files(Path(info.volumes[0].mountpoint), windows.files["p2"])
        engine.unmount(info.id)
        break
    assert {"before bitlocker p2", "after bitlocker p2"} <= set(steps), steps


def test_a_restarted_daemon_verifies_and_unmounts_a_real_volume_without_its_password(
        windows: Guest, tmp_path: Path) -> None:
    with engine_in(tmp_path / "state") as engine:
        info = engine.mount(MountRequest(str(windows.raw), mount_root=str(tmp_path / "media"), volumes=("p2",),
                                         keys=Keys(everywhere=RECOVERY.encode())))
        restarted = Engine(settings=Settings(state_dir=tmp_path / "state"))  # the journal, and no secret
        assert restarted.verify(info.id) == [] and restarted.clean_up(info.id) == info
        restarted.unmount(info.id)
        assert engine.mounts() == [] and not os.path.ismount(info.volumes[0].mountpoint)
