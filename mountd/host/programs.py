"""The external programs imgmount runs: one table, each with its Debian package and what goes without it
(checked once at start-up by :mod:`mountd.host.support`; named by every "install X" message)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Program:
    name: str
    package: str  # Debian's
    used_for: str  # what goes without it


PROGRAMS: tuple[Program, ...] = (
    Program("qemu-img", "qemu-utils", "every image: it reads the header and the backing chain"),
    Program("qemu-nbd", "qemu-utils", "the nbd backend, and inspecting images that are not raw"),
    Program("qemu-storage-daemon", "qemu-system-common",
            "the fuse backend, a caller's own QEMU, and replaying a journal without writing to the image"),
    Program("blkid", "util-linux", "every mount: it identifies filesystems"),
    Program("mount", "mount", "every mount"),
    Program("umount", "mount", "every unmount"),
    Program("sync", "coreutils", "flushing a read-write filesystem before it is unmounted"),
    Program("setpriv", "util-linux", "mounts by other users than root: their QEMU runs as them"),
    Program("dmsetup", "dmsetup", "logical volumes through device-mapper"),
    Program("modprobe", "kmod", "loading the nbd module and filesystem modules"),
    Program("ntfs-3g", "ntfs-3g", "NTFS volumes where the kernel has no ntfs3"),
    Program("mount.exfat-fuse", "exfat-fuse", "exFAT volumes where the kernel has no exfat"),
    Program("fusefat", "fusefat", "FAT volumes (read-only) where the kernel has no vfat"),
    Program("cryptsetup", "cryptsetup-bin", "unlocking LUKS volumes (through device-mapper)"),
    Program("dislocker-fuse", "dislocker", "unlocking BitLocker volumes"),
    Program("setsid", "util-linux", "BitLocker recovery passwords (dislocker reads them from a terminal)"),
    Program("mdadm", "mdadm", "assembling md RAID arrays whose members are all in one image"),
)
#: Other programs whose package a message may name (the tests' tools, the VM lane's).
OTHER_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "losetup": "mount", "sfdisk": "fdisk",
                  "partprobe": "parted", "lvm": "lvm2", "fusermount3": "fuse3"}


def package_of(program: str) -> str:
    found = next((p.package for p in PROGRAMS if p.name == program), None)
    return found or OTHER_PACKAGES.get(program, program)
