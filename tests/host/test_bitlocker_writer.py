"""The test kit's BitLocker writer (imgmount_testkit.bitlocker) against both readers Debian packages.

A GPT disk's NTFS partition (at 1 MiB, 64 MiB, made with mkntfs, files written through ntfs-3g) is encrypted
in place; then dislocker (dislocker-metadata; dislocker-fuse with the password on standard input and with the
recovery password typed at a terminal) and libbde (bdeinfo, bdemount) each open it and show the plain volume
byte for byte, ntfs-3g reads the files back through dislocker, a wrong password is refused, and nothing is
left mounted, attached or running.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import subprocess
import time
import tty
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgmount_testkit import bitlocker, images, windows
from imgmount_testkit.images import MiB
from tests.support import leftovers
from tests.support.bitlocker_guest import FILES, PASSWORD, RECOVERY

LABEL = "TestVolume"
MARKER = b"quarterly report, BitLocker test marker"
DRIVERS = ("dislocker-fuse", "bdemount", "ntfs-3g")


@dataclass(frozen=True)
class Encrypted:
    disk: Path
    offset: int
    size: int
    plain: bytes  # the SHA-256 of the plain volume, before encryption
    seconds: float


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> Encrypted:
    raw = images.blank(tmp_path_factory.mktemp("bde") / "disk.raw", 66 * MiB)
    images.partition(raw, f"label: gpt\nstart=1MiB, size=64MiB, type={windows.BASIC}\n")
    part = images.sfdisk_json(raw)["partitions"][0]
    offset, size = part["start"] * 512, part["size"] * 512
    windows.format_volume(raw, offset, size, "ntfs", FILES, label=LABEL)
    plain = _sha256(raw, offset, size)
    started = time.monotonic()
    bitlocker.encrypt_volume(raw, offset, size, password=PASSWORD, recovery_password=RECOVERY)
    return Encrypted(raw, offset, size, plain, time.monotonic() - started)


@pytest.fixture
def mnt(tmp_path: Path, encrypted: Encrypted) -> Iterator[Path]:
    """Where the test mounts, and the check that nothing of its stays mounted, attached or running."""
    yield tmp_path
    assert _ours_left(tmp_path, encrypted.disk) == []


def test_the_volume_is_encrypted_in_place_quickly(encrypted: Encrypted) -> None:
    with open(encrypted.disk, "rb") as f:
        f.seek(encrypted.offset)
        volume = f.read(encrypted.size)
    assert volume[:11] == b"\xeb\x58\x90-FVE-FS-" and volume[0x1FE:0x200] == b"\x55\xaa"
    assert MARKER not in volume and b"NTFS    " not in volume and b"FILE0" not in volume
    assert encrypted.seconds < 30


def test_dislocker_metadata_lists_both_protectors(encrypted: Encrypted) -> None:
    out = _run(["dislocker-metadata", "-V", str(encrypted.disk), "-o", str(encrypted.offset)])
    assert "[ERROR]" not in out and "[CRITICAL]" not in out
    assert "Current state: ENCRYPTED (4)" in out and "Encryption Type: AES-XTS-128 (0x8004)" in out
    assert f"Encrypted volume size: {encrypted.size} bytes" in out
    assert "Number of boot sectors backuped: 16 sectors" in out
    assert _vmk_protections(out) == [0x0800, 0x2000]  # recovery password, then password, as Windows 10
    assert "UTF-16 string: 'DiskPassword'" in out and f" {LABEL} " in out
    assert "Algo: 0x1000" in out and "Algo: 0x1001" in out  # the two stretch keys


def test_bdeinfo_reads_it_and_unlocks_it_with_either_secret(encrypted: Encrypted) -> None:
    base = ["bdeinfo", "-o", str(encrypted.offset)]
    out = _run([*base, "-p", PASSWORD, str(encrypted.disk)])
    assert re.search(r"Encryption method\s+: AES-XTS 128-bit", out)
    assert re.search(r"Number of key protectors\s+: 2", out)
    assert re.findall(r"Type\s+: (.+)", out) == ["Recovery password", "Password"]
    assert re.search(rf"Description\s+: \S+ {LABEL} \d+/\d+/\d{{4}}", out)
    _run([*base, "-r", RECOVERY, str(encrypted.disk)])
    wrong = subprocess.run([*base, "-p", PASSWORD + "!", str(encrypted.disk)], capture_output=True, text=True,
                           check=False, timeout=120)
    assert wrong.returncode != 0 and "Unable to unlock volume" in wrong.stdout + wrong.stderr


def test_dislocker_fuse_with_the_password_shows_the_plain_volume_and_its_files(encrypted: Encrypted,
                                                                              mnt: Path) -> None:
    """As imgmount does it: dislocker on a read-only loop device of the partition, the password on stdin;
    then ntfs-3g, read-only, on a loop device of dislocker's file."""
    (mnt / "bde").mkdir()
    (mnt / "ntfs").mkdir()
    with images.loop(encrypted.disk, encrypted.offset, encrypted.size, read_only=True) as dev, \
            _dislocker(["-r", "-V", dev, "-u", "--", str(mnt / "bde")], stdin=PASSWORD + "\n"):
        plain = mnt / "bde" / "dislocker-file"
        assert plain.stat().st_size == encrypted.size
        assert _sha256(plain, 0, encrypted.size) == encrypted.plain
        with images.loop(plain, read_only=True) as ntfs_dev, _mounted(["ntfs-3g", "-o", "ro", ntfs_dev],
                                                                       mnt / "ntfs"):
            for name, data in FILES.items():
                assert (mnt / "ntfs" / name).read_bytes() == data, name


def test_dislocker_fuse_takes_the_recovery_password_at_a_terminal(encrypted: Encrypted, mnt: Path) -> None:
    """dislocker reads a recovery password from /dev/tty only: a pty made its controlling terminal by
    ``setsid --ctty``, in raw mode, the 48 digits typed in it."""
    argv = ["dislocker-fuse", "-r", "-V", str(encrypted.disk), "-O", str(encrypted.offset), "-p", "--", str(mnt)]
    try:
        status, shown = _at_terminal(argv, RECOVERY.encode())
        assert status == 0, shown
        assert shown.rstrip().endswith(b"XXXXXX-" * 7 + b"XXXXXX\nValid password format, continuing.")
        assert RECOVERY.encode() in shown  # dislocker echoes the digits as they come, then hides them
        assert _sha256(mnt / "dislocker-file", 0, encrypted.size) == encrypted.plain
    finally:
        _unmount(mnt)


def test_bdemount_takes_the_recovery_password(encrypted: Encrypted, mnt: Path) -> None:
    argv = ["bdemount", "-o", str(encrypted.offset), "-r", RECOVERY, str(encrypted.disk), str(mnt)]
    with _mounted(argv, mnt):
        assert _sha256(mnt / "bde1", 0, encrypted.size) == encrypted.plain


def test_a_wrong_password_is_refused(encrypted: Encrypted, mnt: Path) -> None:
    argv = ["dislocker-fuse", "-r", "-V", str(encrypted.disk), "-O", str(encrypted.offset), "-u", "--", str(mnt)]
    proc = subprocess.run(argv, input=PASSWORD[::-1] + "\n", capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode != 0 and not os.path.ismount(mnt)
    assert "Unable to grab VMK or FVEK" in proc.stdout + proc.stderr


def test_recovery_passwords() -> None:
    assert bitlocker.new_recovery_password(1) == bitlocker.new_recovery_password(1) != RECOVERY
    blocks = RECOVERY.split("-")
    assert len(blocks) == 8 and all(len(b) == 6 and int(b) % 11 == 0 and int(b) < 720896 for b in blocks)
    with pytest.raises(ValueError, match="8 blocks of 6 digits"):
        bitlocker.encrypt_volume(Path("/nonexistent"), 0, 512, password="x",
                                 recovery_password=RECOVERY[:-1] + str((int(RECOVERY[-1]) + 1) % 10))


# ---- helpers ----------------------------------------------------------------------------------------------

def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def _sha256(path: Path, offset: int, size: int) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while size > 0:
            chunk = f.read(min(size, 4 * MiB))
            assert chunk, f"{path} ends early"
            digest.update(chunk)
            size -= len(chunk)
    return digest.digest()


def _vmk_protections(out: str) -> list[int]:
    """The protection of each VMK datum dislocker-metadata prints: the last two bytes of its "nonce"."""
    found = re.findall(r"ENTRY TYPE VMK\n(?:.*\n)*?.*Nonce: \n.*\] ((?:[0-9a-f]{2} ){12})", out)
    return [int.from_bytes(bytes.fromhex(nonce)[10:12], "little") for nonce in found]


@contextlib.contextmanager
def _dislocker(args: Sequence[str], *, stdin: str) -> Iterator[None]:
    """dislocker-fuse mounted (it stays, as a daemon, once its first process ends), unmounted after."""
    mountpoint = Path(args[-1])
    try:
        _run_with_input(["dislocker-fuse", *args], stdin)
        yield
    finally:
        _unmount(mountpoint)


@contextlib.contextmanager
def _mounted(argv: Sequence[str], mountpoint: Path) -> Iterator[None]:
    try:
        _run([*argv, str(mountpoint)])
        yield
    finally:
        _unmount(mountpoint)


def _run_with_input(argv: Sequence[str], stdin: str) -> None:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"


def _unmount(mountpoint: Path) -> None:
    """Unmount a FUSE mount of ours, if mounted (a loop device just detached may hold it a moment), then wait
    for its driver to end: until then it holds what it reads (a loop device would stay attached)."""
    for _ in range(50):
        if not os.path.ismount(mountpoint) or subprocess.run(["umount", str(mountpoint)], capture_output=True,
                                                             check=False).returncode == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"cannot unmount {mountpoint}")
    deadline = time.monotonic() + 30
    while _drivers(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.1)


def _drivers(mountpoint: Path) -> list[str]:
    """The FUSE drivers (dislocker-fuse, bdemount, ntfs-3g) serving ``mountpoint`` or below."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            words = [w.decode(errors="replace") for w in cmd if w]
            if words and os.path.basename(words[0]).startswith(DRIVERS) and any(
                    w.startswith(str(mountpoint)) for w in words[1:]):
                found.append(f"process {pid}: {' '.join(words)}")
    return found


def _at_terminal(argv: Sequence[str], typed: bytes, timeout: float = 120.0) -> tuple[int, bytes]:
    """Run ``argv`` with a new pty, in raw mode, as stdin, stdout, stderr and controlling terminal (``setsid
    --ctty``); type ``typed`` in it; return its exit status and what the terminal showed."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        proc = subprocess.Popen(["setsid", "--ctty", "--wait", *argv], stdin=slave, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    shown, deadline = b"", time.monotonic() + timeout
    try:
        os.write(master, typed)
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # every holder of the slave has gone
                    chunk = b""
                shown += chunk
                if chunk:
                    continue
            if proc.poll() is not None:
                break
        return proc.wait(timeout=1), shown
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ours_left(where: Path, disk: Path) -> list[str]:
    """Mounts (FUSE ones too), loop devices and FUSE drivers of this test's, still there."""
    left = leftovers.ours(sorted(leftovers.snapshot().items), where, disk)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4].startswith(str(where)):
            left.append(f"mount on {line.split()[4]}")
    return left + _drivers(where) + _drivers(disk)
