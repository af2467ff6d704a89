"""Windows guest disks, laid out as Windows setup lays out a UEFI disk, built with the tools Debian has.

GPT: an EFI system partition (FAT32, ``mkfs.vfat``; files by ``mcopy``, as the kernel here may have no vfat),
the 16 MiB Microsoft reserved partition, C: (NTFS, ``mkntfs -Q -F``; files written through ``ntfs-3g`` on a
loop device at the partition's offset), the recovery partition (NTFS) and a data partition (exFAT,
``mkfs.exfat``; files through ``exfat-fuse``). The same image then goes through ``qemu-img convert -O vhdx``,
the format Hyper-V and Windows' own disk tools write.

Variants: ``hibernated`` (hiberfil.sys on C: starts with "HIBR", as Windows leaves it after hibernation or a
Fast Startup shutdown) and ``dirty`` (the NTFS dirty flag, set with ntfs-3g's ``ntfsfix``, which marks a
volume for chkdsk at Windows' next boot).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from imgmount_testkit.images import MiB, blank, convert, loop, partition, run, sfdisk_json

ESP, MSR = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "E3C9E316-0B5C-4DB8-817D-F92DF00215AE"
BASIC, RECOVERY = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC"
#: volume -> (GPT type, name, filesystem, MiB); p2 is the MSR, which holds nothing.
LAYOUT = {
    "p1": (ESP, "EFI system partition", "vfat", 40),
    "p2": (MSR, "Microsoft reserved partition", "", 16),
    "p3": (BASIC, "Basic data partition", "ntfs", 48),
    "p4": (RECOVERY, "", "ntfs", 24),
    "p5": (BASIC, "Basic data partition", "exfat", 16),
}
LABELS = {"p1": "SYSTEM", "p3": "Windows", "p4": "Recovery", "p5": "Data"}
MTOOLS = {"MTOOLS_SKIP_CHECK": "1"}
HIBERNATION_HEADER = b"HIBR" + bytes(4092)


@dataclass(frozen=True)
class WindowsGuest:
    raw: Path
    files: Mapping[str, Mapping[str, bytes]]  # volume -> path -> bytes
    fstypes: Mapping[str, str]


def _blob(seed: str, size: int) -> bytes:
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def contents(c_extra: Mapping[str, bytes] | None = None) -> dict[str, dict[str, bytes]]:
    """What each volume holds: boot files on the ESP, a Windows tree with non-ASCII names on C:."""
    return {
        "p1": {"EFI/Microsoft/Boot/bootmgfw.efi": _blob("bootmgfw", 70_000),
               "EFI/Microsoft/Boot/BCD": _blob("bcd", 32_768),
               "EFI/Boot/bootx64.efi": _blob("bootx64", 5_000)},
        "p3": {"Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\r\n",
               "Users/Public/Documents/Résumé \u2013 naïve café.txt": "ça marche\r\n".encode(),
               "Users/Public/Documents/日本語のメモ.txt": "こんにちは\r\n".encode(),
               "pagefile-sample.bin": _blob("pagefile", 1 * MiB + 123), **(c_extra or {})},
        "p4": {"Recovery/WindowsRE/ReAgent.xml": b"<?xml version='1.0'?><WindowsRE/>\r\n"},
        "p5": {"Data/Photos/été 2024.jpg": _blob("photo", 300_000), "readme.txt": b"exfat data\n"},
    }


def windows_guest(path: Path, *, variant: str = "") -> WindowsGuest:
    """A raw Windows disk at ``path`` (``variant``: "", "hibernated" or "dirty")."""
    layout = LAYOUT
    raw = blank(path, (sum(v[3] for v in layout.values()) + 2) * MiB)
    partition(raw, "label: gpt\n" + "".join(
        f"size={size}MiB, type={kind}" + (f', name="{name}"' if name else "") + "\n"
        for kind, name, _, size in layout.values()))
    parts = {f"p{i + 1}": p for i, p in enumerate(sfdisk_json(raw)["partitions"])}
    files = contents({"hiberfil.sys": HIBERNATION_HEADER} if variant == "hibernated" else None)
    fstypes = {name: spec[2] for name, spec in layout.items() if spec[2]}
    for name, fstype in fstypes.items():
        start, size = parts[name]["start"] * 512, parts[name]["size"] * 512
        format_volume(raw, start, size, fstype, files[name], label=LABELS[name],
                      dirty=variant == "dirty" and name == "p3")
    return WindowsGuest(raw, files, fstypes)


def vhdx(guest: WindowsGuest, path: Path) -> Path:
    return convert(guest.raw, path, "vhdx")


def format_volume(raw: Path, start: int, size: int, fstype: str, files: Mapping[str, bytes], *,
                  label: str = "", dirty: bool = False) -> None:
    """Make a ``fstype`` (vfat, ntfs or exfat) filesystem at ``[start, start+size)`` of ``raw`` holding
    ``files``; ``dirty``: then set the NTFS dirty flag."""
    with loop(raw, start, size) as dev:
        _format(dev, fstype, files, label)
        if dirty:
            run(["ntfsfix", dev])  # checks the volume, then marks it for chkdsk: the dirty flag
    if fstype == "vfat":  # mtools takes no loop device (no geometry): the image file, once it is flushed
        _mcopy(f"{raw}@@{start}", files)


def _format(dev: str, fstype: str, files: Mapping[str, bytes], label: str) -> None:
    named = ["-n" if fstype == "vfat" else "-L", label] if label else []
    if fstype == "vfat":
        run(["mkfs.vfat", "-F", "32", *named, dev])
    elif fstype == "ntfs":
        run(["mkntfs", "-Q", "-F", "-q", *named, dev])
        with _fuse_mounted(["ntfs-3g", dev]) as mnt:
            _write(mnt, files)
    else:
        run(["mkfs.exfat", *named, dev])
        with _fuse_mounted(["mount.exfat-fuse", dev]) as mnt:
            _write(mnt, files)


def _mcopy(image: str, files: Mapping[str, bytes]) -> None:
    """Copy ``files`` into the FAT filesystem of ``image`` (``path@@offset``), directories and all."""
    with tempfile.TemporaryDirectory(prefix="imgmount-esp-") as tmp:
        _write(Path(tmp), files)
        tops = sorted({str(Path(tmp) / name.split("/")[0]) for name in files})
        run(["mcopy", "-s", "-Q", "-i", image, *tops, "::/"], env=MTOOLS)


@contextlib.contextmanager
def _fuse_mounted(argv: list[str]) -> Iterator[Path]:
    """A FUSE driver's read-write mount; unmounting waits for it to write back (fuseblk: the kernel waits
    for the driver's answer to DESTROY)."""
    with tempfile.TemporaryDirectory(prefix="imgmount-win-") as mnt:
        run([*argv, mnt])
        try:
            yield Path(mnt)
        finally:
            run(["umount", mnt])


def _write(mnt: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        target = mnt / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
