"""Encrypted disks laid out as installers lay them out, built with the installers' own tools.

The Ubuntu installer's "encrypt the disk": GPT with an ESP (FAT32), ``/boot`` (ext4) and a LUKS2 partition
holding the LVM volume group ``vgubuntu`` with ``root`` (ext4) and ``swap_1``. And LUKS1 on a partition with
ext4 directly inside, as older installers and hand-made data disks have it.

``cryptsetup luksFormat`` works on a plain loop device anywhere; filling the opened volume needs
device-mapper, so ``with_content=False`` makes the header only (what a host without device-mapper can build).
Passphrases reach cryptsetup on stdin, never in an argument. Key derivation is made cheap (PBKDF2, 1000
iterations) so tests stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imgmount_testkit import images
from imgmount_testkit.crypt_images import FAST_KDF
from imgmount_testkit.images import LVM_ENV, MiB, blank, format_region, loop, mkfs, mounted, partition, run

ESP, LINUX_FS = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
NO_BACKUP = "backup { backup = 0 archive = 0 }"


@dataclass(frozen=True)
class CryptGuest:
    raw: Path
    passphrase: bytes
    files: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)  # volume -> path -> bytes
    fstypes: Mapping[str, str] = field(default_factory=dict)  # volume -> filesystem, once unlocked


def content(volume: str) -> dict[str, bytes]:
    """Files of known content for one volume: a small text and a 64 KiB blob no other volume has."""
    return {"hello.txt": f"hello from {volume}\n".encode(),
            "dir/blob.bin": hashlib.sha256(volume.encode()).digest() * 2048}


def with_stdin(argv: list[str], data: bytes) -> str:
    """Run a tool with ``data`` (a passphrase) on its standard input."""
    proc = subprocess.run(argv, input=data, capture_output=True, check=False, timeout=120,
                          env={**os.environ, **LVM_ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode().strip()}")
    return proc.stdout.decode()


def luks_format(dev: str, passphrase: bytes, version: int) -> None:
    with_stdin(["cryptsetup", "luksFormat", "--batch-mode", f"--type=luks{version}", *FAST_KDF,
                "--key-file=-", dev], passphrase)


@contextlib.contextmanager
def luks_opened(dev: str, passphrase: bytes, name: str) -> Iterator[str]:
    with_stdin(["cryptsetup", "open", "--key-file=-", dev, name], passphrase)
    try:
        yield f"/dev/mapper/{name}"
    finally:
        run(["cryptsetup", "close", name], env=LVM_ENV)


def ubuntu_encrypted(path: Path, passphrase: bytes, *, size: int = 256 * MiB,
                     root_files: Mapping[str, bytes] | None = None, with_content: bool = True) -> CryptGuest:
    """Ubuntu's "encrypt the disk": p1 ESP, p2 /boot, p3 LUKS2 -> LVM ``vgubuntu`` (``root``, ``swap_1``)."""
    raw = blank(path, size)
    partition(raw, f"label: gpt\nsize=40MiB, type={ESP}\nsize=48MiB, type={LINUX_FS}\ntype={LINUX_FS}\n")
    parts = [(p["start"] * 512, p["size"] * 512) for p in images.sfdisk_json(raw)["partitions"]]
    with loop(raw, *parts[0]) as dev:
        run(["mkfs.vfat", "-F", "32", "-n", "ESP", dev])
    format_region(raw, *parts[1], "ext4", label="boot", files=content("p2"))
    files = {"p2": content("p2"), "vgubuntu/root": {**content("vgubuntu/root"), **(root_files or {})}}
    luks2_lvm(raw, *parts[2], passphrase, files["vgubuntu/root"] if with_content else None)
    return CryptGuest(raw, passphrase, files, {"p2": "ext4", "vgubuntu/root": "ext4"})


def luks2_lvm(raw: Path, offset: int, size: int, passphrase: bytes,
              files: Mapping[str, bytes] | None) -> None:
    """LUKS2 in ``[offset, offset+size)`` of ``raw``, holding ``vgubuntu`` with ``swap_1`` and an ext4
    ``root`` that holds ``files`` (None: the LUKS2 header only, which needs no device-mapper)."""
    with loop(raw, offset, size) as dev:
        luks_format(dev, passphrase, 2)
        if files is not None:
            with luks_opened(dev, passphrase, f"build-{raw.stem}") as inside:
                _vgubuntu(inside, files)


def _vgubuntu(pv: str, files: Mapping[str, bytes]) -> None:
    lvm = ["--devices", pv, "--config", NO_BACKUP]
    run(["pvcreate", "-q", *lvm, pv], env=LVM_ENV)
    run(["vgcreate", "-q", *lvm, "vgubuntu", pv], env=LVM_ENV)
    try:
        run(["lvcreate", "-q", "--yes", *lvm, "-L", "16m", "-n", "swap_1", "vgubuntu"], env=LVM_ENV)
        run(["lvcreate", "-q", "--yes", *lvm, "-l", "100%FREE", "-n", "root", "vgubuntu"], env=LVM_ENV)
        mkfs("/dev/mapper/vgubuntu-swap_1", "swap")
        mkfs("/dev/mapper/vgubuntu-root", "ext4", label="root")
        _fill("/dev/mapper/vgubuntu-root", files)
    finally:
        run(["vgchange", "-q", "-an", *lvm, "vgubuntu"], env=LVM_ENV)


def _fill(dev: str, files: Mapping[str, bytes]) -> None:
    with mounted(dev) as mnt:
        for name, data in files.items():
            (mnt / name).parent.mkdir(parents=True, exist_ok=True)
            (mnt / name).write_bytes(data)


def luks1_partition(path: Path, passphrase: bytes, *, size: int = 96 * MiB) -> CryptGuest:
    """GPT: p1 ext4, p2 LUKS1 holding ext4 directly (device-mapper needed)."""
    raw = blank(path, size)
    partition(raw, f"label: gpt\nsize=24MiB, type={LINUX_FS}\ntype={LINUX_FS}\n")
    parts = [(p["start"] * 512, p["size"] * 512) for p in images.sfdisk_json(raw)["partitions"]]
    format_region(raw, *parts[0], "ext4", label="plain", files=content("p1"))
    with loop(raw, *parts[1]) as dev:
        luks_format(dev, passphrase, 1)
        with luks_opened(dev, passphrase, f"build-{path.stem}") as inside:
            mkfs(inside, "ext4", label="secret")
            _fill(inside, content("p2"))
    files = {"p1": content("p1"), "p2": content("p2")}
    return CryptGuest(raw, passphrase, files, {"p1": "ext4", "p2": "ext4"})
