"""Which filesystems may be mounted, and with which options (design: "Filesystems").

Pure decisions on values, plus one thin reader (:func:`mountable_types`) of what this kernel can mount.

Every mount gets ``nosuid,nodev`` and ``ro`` or ``rw``. A read-only mount of a filesystem whose driver would
otherwise replay a journal or log (which writes to the device) gets the option that suppresses the replay,
unless the volume has writes pending in its journal (:mod:`mountd.image.recovery`) and the mount reaches it
through a throwaway copy-on-write overlay that takes the replay's writes (``replay``, see
:mod:`mountd.engine.volumes`):

==========  ======================  ======================================================================
ext3/ext4   ``noload``              shown as ``norecovery`` in mountinfo
xfs         ``norecovery``          without it a dirty log on a read-only device refuses to mount at all
btrfs       ``rescue=nologreplay``  the 5.9+ name; the old ``nologreplay`` is rejected by 6.x kernels
f2fs        ``norecovery``          no roll-forward recovery
nilfs2      ``norecovery``
==========  ======================  ======================================================================

The others need none: ext2, vfat, exfat, minix, ufs, iso9660, udf, squashfs, erofs and cramfs have no
journal; jfs leaves log replay to ``fsck.jfs``; hfsplus mounts a journaled volume read-only without
replaying it; reiserfs has no working option (it refuses to mount a dirty journal from a read-only device,
and the block layer below a read-only mount is always read-only). ntfs3 replays ``$LogFile`` only on a
read-write mount.

Two defaults beyond the design, both for untrusted images: ext2/3/4 get ``errors=remount-ro``, because a
crafted superblock can ask for ``errors=panic`` (on-disk default or ``s_mount_opts``) and a mount option
overrides it; xfs gets ``nouuid``, so two clones of one VM (same filesystem UUID) mount side by side.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mountd.errors import InvalidArgumentError, UnsupportedError
from mountd.host import command

#: On-disk filesystems we mount (kernel type names, plus blkid's "ntfs").
ON_DISK: frozenset[str] = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "exfat", "ntfs3", "ntfs", "iso9660", "udf", "squashfs",
    "erofs", "f2fs", "hfsplus", "jfs", "reiserfs", "nilfs2", "minix", "ufs", "cramfs",
})

#: Signatures blkid reports that are never mounted, with the reason.
NOT_FILESYSTEMS: dict[str, str] = {
    "swap": "it is swap space, not a filesystem",
    "LVM2_member": "it is an LVM physical volume: its logical volumes are mounted instead",
    "crypto_LUKS": "it is encrypted with LUKS: give its passphrase to mount what it holds",
    "BitLocker": "it is encrypted with BitLocker: give its password to mount what it holds",
    "linux_raid_member": "it is a member of an md RAID array: mount the array's volume (md/NAME) instead",
    "isw_raid_member": "it is a member of a firmware RAID array, and imgmount does not assemble arrays",
    "ddf_raid_member": "it is a member of a firmware RAID array, and imgmount does not assemble arrays",
    "zfs_member": "it is a member of a ZFS pool, which the Linux kernel cannot mount by itself",
}

#: Filesystem type -> the kernel module that provides it, where the names differ or a note helps.
MODULES: dict[str, str] = {
    "iso9660": "isofs", "ntfs": "ntfs3", "reiserfs": "reiserfs (removed in Linux 6.13)",
}

READ_ONLY_TYPES: frozenset[str] = frozenset({"iso9660", "squashfs", "erofs", "cramfs"})
NO_OWNERSHIP: frozenset[str] = frozenset({"vfat", "exfat", "ntfs3", "ntfs", "iso9660", "udf"})
NO_REPLAY: dict[str, str] = {
    "ext3": "noload", "ext4": "noload", "xfs": "norecovery", "btrfs": "rescue=nologreplay",
    "f2fs": "norecovery", "nilfs2": "norecovery",
}
#: Mount options that suppress a replay, whichever filesystem takes them.
REPLAY_OFF = frozenset({*NO_REPLAY.values(), "norecovery", "rescue=all"})
FS_DEFAULTS: dict[str, tuple[str, ...]] = {
    "ext2": ("errors=remount-ro",), "ext3": ("errors=remount-ro",), "ext4": ("errors=remount-ro",),
    "xfs": ("nouuid",),
}
ALWAYS = ("nosuid", "nodev")


@dataclass(frozen=True)
class Opt:
    """What a mount option accepts: a value matching ``values`` (a regex), and/or no value at all."""

    values: str | None = None
    flag: bool = True
    read_only: bool = False  # only valid on a read-only mount


FLAG = Opt()
RO_FLAG = Opt(read_only=True)


def value(pattern: str, *, flag: bool = False, read_only: bool = False) -> Opt:
    return Opt(values=pattern, flag=flag, read_only=read_only)


OCTAL, NUMBER, CHARSET = value(r"[0-7]{1,4}"), value(r"[0-9]{1,9}"), value(r"[a-z0-9][a-z0-9_-]{0,31}")
# btrfs subvolume path: printable, none of what mount(8)'s option parser treats specially.
SUBVOL = value(r"[^\x00-\x1f\x7f,=\"'\\]{1,255}")
COMPRESS = value(r"(zlib|lzo|zstd)(:[0-9]{1,2})?|no", flag=True)

GENERIC: dict[str, Opt] = {name: FLAG for name in (
    "ro", "rw", "nosuid", "nodev", "noexec", "noatime", "atime", "relatime", "strictatime", "nodiratime",
    "lazytime", "nolazytime", "sync", "async", "dirsync", "nosymfollow",
)}
_EXT = {"acl": FLAG, "noacl": FLAG, "user_xattr": FLAG, "nouser_xattr": FLAG, "discard": FLAG,
        "nodiscard": FLAG, "errors": value("remount-ro")}
_EXT_JOURNAL = {**_EXT, "commit": NUMBER, "data": value("ordered|journal|writeback"), "noload": RO_FLAG,
                "norecovery": RO_FLAG}
_MASKS = {"umask": OCTAL, "dmask": OCTAL, "fmask": OCTAL, "iocharset": CHARSET}
_NTFS = {**_MASKS, "discard": FLAG, "hide_dot_files": FLAG, "windows_names": FLAG, "sparse": FLAG,
         "showmeta": FLAG}
PER_FS: dict[str, dict[str, Opt]] = {
    "ext2": _EXT, "ext3": _EXT_JOURNAL, "ext4": _EXT_JOURNAL,
    "xfs": {"nouuid": FLAG, "inode64": FLAG, "inode32": FLAG, "discard": FLAG, "nodiscard": FLAG,
            "largeio": FLAG, "nolargeio": FLAG, "norecovery": RO_FLAG},
    "btrfs": {"subvol": SUBVOL, "subvolid": NUMBER, "compress": COMPRESS, "compress-force": COMPRESS,
              "autodefrag": FLAG, "noautodefrag": FLAG, "ssd": FLAG, "nossd": FLAG, "ssd_spread": FLAG,
              "nossd_spread": FLAG, "discard": value("sync|async", flag=True), "nodiscard": FLAG,
              "commit": NUMBER, "rescue": value(
                  "nologreplay|usebackuproot|ignorebadroots|ignoredatacsums|ignoremetacsums|all",
                  read_only=True)},
    "vfat": {**_MASKS, "shortname": value("lower|win95|winnt|mixed"), "utf8": FLAG, "codepage": NUMBER,
             "flush": FLAG, "tz": value("UTC"), "showexec": FLAG, "quiet": FLAG, "allow_utime": OCTAL},
    "exfat": {**_MASKS, "discard": FLAG, "allow_utime": OCTAL},
    "ntfs3": _NTFS, "ntfs": _NTFS,
    "iso9660": {"norock": FLAG, "nojoliet": FLAG, "map": value("off|normal|acorn"),
                "check": value("relaxed|strict"), "session": NUMBER, "sbsector": NUMBER, "iocharset": CHARSET,
                "utf8": FLAG, "mode": OCTAL, "dmode": OCTAL, "unhide": FLAG},
    "udf": {"umask": OCTAL, "mode": OCTAL, "dmode": OCTAL, "unhide": FLAG, "undelete": FLAG,
            "iocharset": CHARSET, "utf8": FLAG, "session": NUMBER, "anchor": NUMBER, "lastblock": NUMBER,
            "novrs": FLAG},
    "f2fs": {"discard": FLAG, "nodiscard": FLAG, "norecovery": RO_FLAG},
    "nilfs2": {"norecovery": RO_FLAG},
    "ufs": {"ufstype": value("old|44bsd|ufs2|5xbsd|sun|sunx86|hp|nextstep|nextstep-cd|openstep")},
}
#: Set from the owner or by us; a caller may not choose them.
RESERVED = frozenset({"uid", "gid"})
BAD_CHARS = {",": "a comma", "\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte",
             '"': "a quote", "'": "a quote", "\\": "a backslash", " ": "a space", "\t": "a tab"}
MAX_OPTION = 256


# ---- which types ------------------------------------------------------------------------------------------


def parse_proc_filesystems(text: str) -> frozenset[str]:
    """Block-device filesystems registered in the kernel (``/proc/filesystems`` lines without ``nodev``)."""
    found = set()
    for line in text.splitlines():
        flag, _, name = line.partition("\t")
        if not flag and name.strip():
            found.add(name.strip())
    return frozenset(found)


def module_would_load(dry_run_output: str, status: int) -> bool:
    """Whether ``modprobe -n -v fs-TYPE`` (what the kernel runs for an unknown type) would load a module.

    Status 1 means no module (or the alias is blacklisted); ``install /bin/false`` (hardening guides) or
    ``/bin/true`` loads nothing; any other install command is trusted to load it."""
    if status != 0:
        return False
    for line in dry_run_output.splitlines():
        verb, _, rest = line.strip().partition(" ")
        if verb == "insmod":
            return True
        if verb == "install":
            program = os.path.basename(rest.split()[0]) if rest.split() else "true"
            return program not in ("false", "true")
    return False


def mountable_from(registered: Iterable[str], loadable: Iterable[str]) -> frozenset[str]:
    """The allow-listed types among those registered now or loadable as a module."""
    return ON_DISK & (frozenset(registered) | frozenset(loadable))


def mountable_types() -> frozenset[str]:
    """Filesystem types this kernel can mount now or after loading a module, within :data:`ON_DISK`."""
    with open("/proc/filesystems", encoding="utf-8") as f:
        registered = parse_proc_filesystems(f.read())
    return mountable_from(registered, _loadable(os.uname().release, ON_DISK - registered))


def _loadable(release: str, missing: frozenset[str]) -> frozenset[str]:
    if not _modules_load(release):
        return frozenset()
    return frozenset(fstype for fstype in missing if _module_loads(release, fstype))


@functools.lru_cache(maxsize=4)
def _modules_load(release: str) -> bool:
    """Whether this kernel loads modules at all (asked once a process, as before: each mount asks)."""
    # No /proc/sys/kernel/modprobe: a kernel without module support. No /lib/modules/RELEASE: none installed.
    if not os.path.exists("/proc/sys/kernel/modprobe") or not os.path.isdir(f"/lib/modules/{release}"):
        return False
    return _read_first("/proc/sys/kernel/modules_disabled") != "1" and command.have("modprobe")


@functools.lru_cache(maxsize=64)
def _module_loads(release: str, fstype: str) -> bool:
    """Asked once a type (and kernel) per process: the set of types still missing shrinks as mounts load
    their modules, and asking again for every other type each time cost a modprobe each."""
    result = command.run(["modprobe", "-n", "-v", f"fs-{fstype}"], check=False, timeout=10)
    return module_would_load(result.stdout, result.status)


def _read_first(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def mount_type(fstype: str, available: frozenset[str] | None = None) -> str:
    """The ``mount -t`` type for a blkid type: ntfs through ntfs3 where the kernel has it, ext2/ext3 through
    the ext4 driver when the kernel registers no separate type for them."""
    have = mountable_types() if available is None else available
    if fstype == "ntfs" and "ntfs3" in have:
        return "ntfs3"
    if fstype in ("ext2", "ext3") and fstype not in have and "ext4" in have:
        return "ext4"
    return fstype


def check_mountable(fstype: str, available: frozenset[str] | None = None) -> None:
    """Raise UnsupportedError unless ``fstype`` is an on-disk filesystem this kernel can mount."""
    if fstype in NOT_FILESYSTEMS:
        raise UnsupportedError(f"a {fstype} volume cannot be mounted: {NOT_FILESYSTEMS[fstype]}")
    if fstype not in ON_DISK:
        raise UnsupportedError(f"imgmount does not mount {fstype or 'unknown'} volumes: only known on-disk "
                               f"filesystems are mounted ({', '.join(sorted(ON_DISK))})")
    have = mountable_types() if available is None else available
    if mount_type(fstype, have) not in have:
        module = MODULES.get(fstype, fstype)
        raise UnsupportedError(
            f"this kernel ({os.uname().release}) cannot mount {fstype} filesystems: it needs the kernel "
            f"module {module}, which comes with the kernel's own package (linux-image-* on Debian)")


# ---- which options ----------------------------------------------------------------------------------------


def primary_gid(uid: int) -> int:
    """The owner's primary group, or 0 (root's group) for a uid without a passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return 0


def mount_options(fstype: str, *, read_only: bool, requested: Sequence[str], owner_uid: int,
                  owner_gid: int | None = None, replay: bool = False) -> list[str]:
    """The full ``-o`` list for mounting ``fstype`` (a ``mount -t`` type) on behalf of ``owner_uid``.

    ``requested`` options are checked one by one against the allow-list; a bad one raises
    InvalidArgumentError naming it. ``owner_gid`` defaults to the owner's primary group. ``replay``: a
    read-only mount that may replay the journal, because what it writes goes to a throwaway overlay."""
    if fstype in READ_ONLY_TYPES and not read_only:
        raise UnsupportedError(f"{fstype} filesystems are read-only: mount this volume read-only")
    options = ["ro" if read_only else "rw", *ALWAYS]
    if read_only and fstype in NO_REPLAY and not replay:
        options.append(NO_REPLAY[fstype])
    options += FS_DEFAULTS.get(fstype, ())
    if fstype in NO_OWNERSHIP:
        gid = primary_gid(owner_uid) if owner_gid is None else owner_gid
        options += [f"uid={owner_uid}", f"gid={gid}"]
    for option in requested:
        check_option(fstype, option, read_only=read_only)
        if option not in options:
            options.append(option)
    return options


def replay_refused(requested: Sequence[str]) -> bool:
    """The caller asked for a mount without journal or log replay."""
    return any(option in REPLAY_OFF for option in requested)


def check_option(fstype: str, option: str, *, read_only: bool) -> None:
    """Raise InvalidArgumentError unless ``option`` is one allow-listed option, valid for this mount."""
    shown = repr(option[:60] + ("..." if len(option) > 60 else ""))
    if not option:
        raise InvalidArgumentError("an empty mount option was given")
    if len(option) > MAX_OPTION:
        raise InvalidArgumentError(f"mount option {shown} is longer than {MAX_OPTION} characters")
    for char, name in BAD_CHARS.items():
        if char in option:
            raise InvalidArgumentError(f"mount option {shown} contains {name}: give each option separately")
    if not option.isprintable():
        raise InvalidArgumentError(f"mount option {shown} contains a control character")
    name, has_value, val = option.partition("=")
    if name in RESERVED:
        raise InvalidArgumentError(f"mount option {shown} is not allowed: {name} is set to the mount's owner")
    spec = {**GENERIC, **PER_FS.get(fstype, {})}.get(name)
    if spec is None:
        raise InvalidArgumentError(f"mount option {shown} is not allowed for {fstype} (allowed: "
                                   f"{', '.join(allowed_options(fstype))})")
    if has_value and (spec.values is None or not re.fullmatch(spec.values, val)):
        wants = "takes no value" if spec.values is None else f"takes a value matching {spec.values}"
        raise InvalidArgumentError(f"mount option {shown} is not allowed: {name} {wants}")
    if not has_value and not spec.flag:
        raise InvalidArgumentError(f"mount option {shown} needs a value ({name}=...)")
    _check_mode(shown, name, spec, read_only=read_only)


def _check_mode(shown: str, name: str, spec: Opt, *, read_only: bool) -> None:
    if read_only and name == "rw":
        raise InvalidArgumentError(f"mount option {shown} contradicts a read-only mount: ask for a "
                                   "read-write mount instead")
    if not read_only and name == "ro":
        raise InvalidArgumentError(f"mount option {shown} contradicts a read-write mount: ask for a "
                                   "read-only mount instead")
    if not read_only and spec.read_only:
        raise InvalidArgumentError(f"mount option {shown} is only allowed on a read-only mount")


def allowed_options(fstype: str) -> list[str]:
    """Option names a caller may pass for ``fstype`` (``name=`` for those that take a value)."""
    specs = {**GENERIC, **PER_FS.get(fstype, {})}
    return sorted(name + ("=" if spec.values is not None and not spec.flag else "")
                  for name, spec in specs.items())
