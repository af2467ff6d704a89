"""Which driver mounts NTFS, FAT and exFAT (the kernel's where it has one, else the FUSE program), and the
options a FUSE driver gets: those of the kernel driver, plus what makes a FUSE mount behave like one."""

from __future__ import annotations

import pytest

from mountd.errors import CommandError, InvalidArgumentError, InvalidImageError, UnsupportedError
from mountd.host import filesystems, fusedrivers
from mountd.host.programs import PROGRAMS
from mountd.host.support import HostSupport

EVERYTHING = frozenset(p.name for p in PROGRAMS)
DEBIAN_12 = frozenset({"ext4", "xfs", "btrfs", "vfat", "exfat"})  # its kernel: no ntfs3
THIS_HOST = frozenset({"ext4", "xfs", "btrfs"})


def host(*, fuse: bool = True, lacking: tuple[str, ...] = ()) -> HostSupport:
    return HostSupport(tuple(p for p in PROGRAMS if p.name in lacking), fuse=fuse, programs=EVERYTHING - set(lacking))


@pytest.mark.parametrize(("fstype", "kernel", "expected"), [
    ("ntfs", DEBIAN_12, "ntfs-3g"), ("vfat", DEBIAN_12, None), ("exfat", DEBIAN_12, None),
    ("ntfs3", DEBIAN_12 | {"ntfs3"}, None),  # mount_type("ntfs") is ntfs3 where the kernel has it
    ("vfat", THIS_HOST, "fusefat"), ("exfat", THIS_HOST, "mount.exfat-fuse"), ("ext4", THIS_HOST, None),
])
def test_the_kernel_driver_wins_where_there_is_one(fstype: str, kernel: frozenset[str], expected: str | None) -> None:
    driver = fusedrivers.driver_for(fstype, kernel, host())
    assert (driver.program if driver else None) == expected


def test_ntfs_goes_to_ntfs3_where_the_kernel_has_it() -> None:
    kernel = DEBIAN_12 | {"ntfs3"}
    available = fusedrivers.mountable_types(kernel, host())
    assert filesystems.mount_type("ntfs", available) == "ntfs3"
    assert fusedrivers.driver_for("ntfs3", kernel, host()) is None


def test_no_fuse_or_no_program_means_no_driver_and_the_kernel_error() -> None:
    assert fusedrivers.driver_for("ntfs", THIS_HOST, host(fuse=False)) is None
    assert fusedrivers.driver_for("ntfs", THIS_HOST, host(lacking=("ntfs-3g",))) is None
    assert fusedrivers.mountable_types(THIS_HOST, host(lacking=("ntfs-3g",))) == THIS_HOST | {"vfat", "exfat"}
    with pytest.raises(UnsupportedError, match="cannot mount ntfs filesystems: it needs the kernel module ntfs3"):
        filesystems.check_mountable("ntfs", THIS_HOST)


def test_a_driver_gets_the_owner_like_the_kernel_and_allow_other_with_kernel_permission_checks() -> None:
    kernel = filesystems.mount_options("ntfs", read_only=True, requested=(), owner_uid=1000, owner_gid=1000)
    options = fusedrivers.driver_options(fusedrivers.DRIVERS["ntfs"], kernel, (), "/dev/loop3")
    assert options == ["ro", "nosuid", "nodev", "uid=1000", "gid=1000", "umask=022", "allow_other",
                       "default_permissions"]


def test_a_callers_mask_replaces_the_default_and_fusefat_names_its_device() -> None:
    kernel = filesystems.mount_options("vfat", read_only=True, requested=("umask=077",), owner_uid=7, owner_gid=7)
    options = fusedrivers.driver_options(fusedrivers.DRIVERS["vfat"], kernel, ("umask=077",), "/dev/loop9")
    assert "umask=022" not in options and "umask=077" in options
    assert options[-2:] == ["fsname=/dev/loop9", "subtype=fusefat"]


def test_options_the_driver_does_not_take_are_refused_by_name() -> None:
    kernel = filesystems.mount_options("ntfs", read_only=True, requested=("iocharset=utf8",), owner_uid=0)
    with pytest.raises(InvalidArgumentError, match="'iocharset=utf8' is not taken by ntfs-3g"):
        fusedrivers.driver_options(fusedrivers.DRIVERS["ntfs"], kernel, ("iocharset=utf8",), "/dev/loop0")


def test_fusefat_does_not_write() -> None:
    kernel = filesystems.mount_options("vfat", read_only=False, requested=(), owner_uid=0)
    with pytest.raises(UnsupportedError, match="fusefat writes only experimentally"):
        fusedrivers.driver_options(fusedrivers.DRIVERS["vfat"], kernel, (), "/dev/loop0")


def test_a_journal_names_only_known_drivers() -> None:
    assert fusedrivers.by_program("ntfs-3g") is fusedrivers.DRIVERS["ntfs"]
    with pytest.raises(InvalidArgumentError, match="not a FUSE filesystem driver"):
        fusedrivers.by_program("/bin/sh")


def test_a_drivers_refusal_says_why_in_its_own_words() -> None:
    hibernated = CommandError(["ntfs-3g"], 14, "Windows is hibernated, refused to mount.\n"
                              "Falling back to read-only mount because the NTFS partition is in an\nunsafe state.")
    assert isinstance(fusedrivers.refusal(hibernated, "C:", fusedrivers.DRIVERS["ntfs"]), InvalidArgumentError)
    broken = CommandError(["ntfs-3g"], 13, "ntfs_mst_post_read_fixup_warn: magic: 0x00000000\n"
                          "Record 0 has no FILE magic (0x0)\nFailed to mount '/dev/loop0': Input/output error\n"
                          "NTFS is either inconsistent, or there is a hardware fault, or it's a\n"
                          "for more details.\n")
    error = fusedrivers.refusal(broken, "the ntfs filesystem on /dev/loop0", fusedrivers.DRIVERS["ntfs"])
    assert isinstance(error, InvalidImageError)
    assert str(error) == ("ntfs-3g cannot mount the ntfs filesystem on /dev/loop0: Record 0 has no FILE magic "
                          "(0x0); Failed to mount '/dev/loop0': Input/output error (check it with chkdsk /f in "
                          "Windows, or ntfsfix -n on a copy of the image)")
