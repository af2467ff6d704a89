"""mountd.host.filesystems: which types are mounted, and the option checker (exhaustive tables plus hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mountd.errors import InvalidArgumentError, UnsupportedError
from mountd.host import filesystems as fs

PROC_FILESYSTEMS = ("nodev\tsysfs\nnodev\ttmpfs\n\text3\n\text2\n\text4\n\tsquashfs\nnodev\tfuse\n\tfuseblk\n"
                    "\txfs\n\terofs\nnodev\tmqueue\n\tbtrfs\n")
EVERYTHING = fs.ON_DISK


# ---- which types ------------------------------------------------------------------------------------------


def test_proc_filesystems_keeps_block_filesystems_only() -> None:
    assert fs.parse_proc_filesystems(PROC_FILESYSTEMS) == {
        "ext2", "ext3", "ext4", "squashfs", "fuseblk", "xfs", "erofs", "btrfs"}
    assert fs.parse_proc_filesystems("") == frozenset()


@pytest.mark.parametrize(("output", "status", "loads"), [
    ("insmod /lib/modules/6.1.0-56-amd64/kernel/fs/fat/fat.ko \n"
     "insmod /lib/modules/6.1.0-56-amd64/kernel/fs/fat/vfat.ko \n", 0, True),
    ("", 1, False),  # no such module, or its fs- alias is blacklisted
    ("install /bin/false\n", 0, False),  # the usual hardening line
    ("install /usr/bin/true\n", 0, False),
    ("install /sbin/modprobe --ignore-install vfat && echo loaded\n", 0, True),
    ("", 0, False),  # already loaded: then /proc/filesystems lists it
    ("builtin vfat\n", 0, False),  # built in: likewise
    ("insmod /x.ko\n", 1, False),
])
def test_modprobe_dry_run_is_read(output: str, status: int, loads: bool) -> None:
    assert fs.module_would_load(output, status) is loads


def test_only_on_disk_filesystems_are_mountable() -> None:
    registered = fs.parse_proc_filesystems(PROC_FILESYSTEMS)
    assert fs.mountable_from(registered, {"vfat", "swap", "ntfs3"}) == {
        "ext2", "ext3", "ext4", "squashfs", "xfs", "erofs", "btrfs", "vfat", "ntfs3"}


def test_this_kernels_types_include_what_proc_lists() -> None:
    with open("/proc/filesystems", encoding="utf-8") as f:
        registered = fs.parse_proc_filesystems(f.read())
    found = fs.mountable_types()
    assert registered & EVERYTHING <= found <= EVERYTHING


@pytest.mark.parametrize(("blkid", "available", "mounted_as"), [
    ("ntfs", {"ntfs3", "ntfs"}, "ntfs3"),
    ("ntfs", {"ntfs"}, "ntfs"),
    ("ext2", {"ext4"}, "ext4"),
    ("ext3", {"ext4"}, "ext4"),
    ("ext2", {"ext2", "ext4"}, "ext2"),
    ("xfs", {"xfs"}, "xfs"),
])
def test_mount_type(blkid: str, available: set[str], mounted_as: str) -> None:
    assert fs.mount_type(blkid, frozenset(available)) == mounted_as


@pytest.mark.parametrize("signature", sorted(fs.NOT_FILESYSTEMS))
def test_non_filesystems_are_refused_with_the_reason(signature: str) -> None:
    with pytest.raises(UnsupportedError, match=signature):
        fs.check_mountable(signature, EVERYTHING)


def test_unknown_types_are_refused() -> None:
    with pytest.raises(UnsupportedError, match="does not mount ocfs2 volumes"):
        fs.check_mountable("ocfs2", EVERYTHING | {"ocfs2"})


@pytest.mark.parametrize(("fstype", "module"), [("vfat", "vfat"), ("iso9660", "isofs"), ("ntfs", "ntfs3")])
def test_a_type_the_kernel_lacks_names_the_module(fstype: str, module: str) -> None:
    with pytest.raises(UnsupportedError, match=f"cannot mount {fstype} filesystems: .* module {module}"):
        fs.check_mountable(fstype, frozenset({"ext4"}))


@pytest.mark.parametrize("fstype", sorted(EVERYTHING))
def test_every_allowed_type_passes_where_the_kernel_has_it(fstype: str) -> None:
    fs.check_mountable(fstype, EVERYTHING)


# ---- which options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fstype", "expected"), [
    ("ext2", ["ro", "nosuid", "nodev", "errors=remount-ro"]),
    ("ext3", ["ro", "nosuid", "nodev", "noload", "errors=remount-ro"]),
    ("ext4", ["ro", "nosuid", "nodev", "noload", "errors=remount-ro"]),
    ("xfs", ["ro", "nosuid", "nodev", "norecovery", "nouuid"]),
    ("btrfs", ["ro", "nosuid", "nodev", "rescue=nologreplay"]),
    ("f2fs", ["ro", "nosuid", "nodev", "norecovery"]),
    ("nilfs2", ["ro", "nosuid", "nodev", "norecovery"]),
    ("vfat", ["ro", "nosuid", "nodev", "uid=1000", "gid=100"]),
    ("exfat", ["ro", "nosuid", "nodev", "uid=1000", "gid=100"]),
    ("ntfs3", ["ro", "nosuid", "nodev", "uid=1000", "gid=100"]),
    ("iso9660", ["ro", "nosuid", "nodev", "uid=1000", "gid=100"]),
    ("udf", ["ro", "nosuid", "nodev", "uid=1000", "gid=100"]),
    ("squashfs", ["ro", "nosuid", "nodev"]),
    ("hfsplus", ["ro", "nosuid", "nodev"]),
])
def test_read_only_defaults(fstype: str, expected: list[str]) -> None:
    assert fs.mount_options(fstype, read_only=True, requested=[], owner_uid=1000, owner_gid=100) == expected


@pytest.mark.parametrize(("fstype", "expected"), [
    ("ext4", ["rw", "nosuid", "nodev", "errors=remount-ro"]),
    ("xfs", ["rw", "nosuid", "nodev", "nouuid"]),
    ("btrfs", ["rw", "nosuid", "nodev"]),
    ("vfat", ["rw", "nosuid", "nodev", "uid=0", "gid=0"]),
])
def test_read_write_defaults_replay_the_journal(fstype: str, expected: list[str]) -> None:
    assert fs.mount_options(fstype, read_only=False, requested=[], owner_uid=0, owner_gid=0) == expected


def test_the_owners_primary_group_is_looked_up() -> None:
    options = fs.mount_options("vfat", read_only=True, requested=[], owner_uid=0)
    assert options[-2:] == ["uid=0", "gid=0"]
    assert fs.primary_gid(2**31 - 2) == 0  # no passwd entry: root's group


@pytest.mark.parametrize("fstype", sorted(fs.READ_ONLY_TYPES))
def test_read_only_filesystems_refuse_read_write(fstype: str) -> None:
    with pytest.raises(UnsupportedError, match=f"{fstype} filesystems are read-only"):
        fs.mount_options(fstype, read_only=False, requested=[], owner_uid=0)


@pytest.mark.parametrize(("fstype", "requested"), [
    ("ext4", ["noatime", "nodiratime", "noexec", "sync", "dirsync", "relatime", "lazytime", "nosymfollow"]),
    ("ext4", ["acl", "user_xattr", "data=journal", "commit=30", "errors=remount-ro"]),
    ("xfs", ["inode64", "nouuid", "largeio"]),
    ("btrfs", ["subvol=@home", "subvol=snapshots/2024-01-01", "subvolid=256", "compress=zstd:3", "compress", "ssd",
               "discard=async", "discard", "rescue=usebackuproot"]),
    ("vfat", ["umask=077", "shortname=mixed", "utf8", "iocharset=iso8859-1", "codepage=850", "tz=UTC"]),
    ("iso9660", ["norock", "map=off", "session=2", "mode=0644"]),
    ("udf", ["unhide", "undelete", "mode=0444"]),
    ("ntfs3", ["windows_names", "fmask=0133", "hide_dot_files"]),
])
def test_allowed_options_are_kept_in_order(fstype: str, requested: list[str]) -> None:
    defaults = fs.mount_options(fstype, read_only=True, requested=[], owner_uid=0)
    options = fs.mount_options(fstype, read_only=True, requested=requested, owner_uid=0)
    assert options == defaults + [o for o in requested if o not in defaults]


def test_repeats_and_defaults_are_not_doubled() -> None:
    options = fs.mount_options("ext4", read_only=True, requested=["ro", "nosuid", "noload", "noatime",
                                                                  "noatime"], owner_uid=0)
    assert options == ["ro", "nosuid", "nodev", "noload", "errors=remount-ro", "noatime"]


@pytest.mark.parametrize(("fstype", "read_only", "option", "message"), [
    ("ext4", True, "ro,exec", "'ro,exec' contains a comma"),
    ("ext4", True, "noatime,suid", "contains a comma"),
    ("ext4", True, "noatime\nsuid", "contains a newline"),
    ("ext4", True, "noatime\rx", "contains a carriage return"),
    ("ext4", True, "noatime\0suid", "contains a NUL byte"),
    ("btrfs", True, 'subvol="a,b"', "contains a comma"),
    ("btrfs", True, 'subvol="ab"', "contains a quote"),
    ("btrfs", True, "subvol=a\\054b", "contains a backslash"),
    ("ext4", True, "noatime ", "contains a space"),
    ("ext4", True, "\x1b[2J", "control character"),
    ("ext4", True, "", "empty mount option"),
    ("ext4", True, "x" * 300, "longer than 256"),
    ("ext4", True, "suid", "'suid' is not allowed for ext4"),
    ("ext4", True, "dev", "'dev' is not allowed"),
    ("ext4", True, "exec", "'exec' is not allowed"),
    ("ext4", True, "defaults", "'defaults' is not allowed"),
    ("ext4", True, "journal_path=/dev/sda", "'journal_path=/dev/sda' is not allowed"),
    ("ext4", True, "errors=panic", "errors takes a value matching remount-ro"),
    ("ext4", True, "noatime=1", "noatime takes no value"),
    ("ext4", True, "commit", "needs a value"),
    ("ext4", True, "commit=1e9", "commit takes a value matching"),
    ("ext4", True, "NOATIME", "'NOATIME' is not allowed"),
    ("ext4", True, "X-mount.mkdir", "is not allowed"),
    ("ext4", True, "rw", "contradicts a read-only mount"),
    ("ext4", False, "ro", "contradicts a read-write mount"),
    ("ext4", False, "noload", "only allowed on a read-only mount"),
    ("xfs", False, "norecovery", "only allowed on a read-only mount"),
    ("btrfs", False, "rescue=nologreplay", "only allowed on a read-only mount"),
    ("vfat", True, "uid=0", "uid is set to the mount's owner"),
    ("vfat", True, "gid=0", "gid is set to the mount's owner"),
    ("vfat", True, "umask=999", "umask takes a value"),
    ("vfat", True, "iocharset=../../x", "iocharset takes a value"),
    ("xfs", True, "subvol=@", "'subvol=@' is not allowed for xfs"),
    ("hfsplus", True, "force", "'force' is not allowed"),
])
def test_bad_options_are_refused_by_name(fstype: str, read_only: bool, option: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        fs.mount_options(fstype, read_only=read_only, requested=["noatime", option], owner_uid=0)


def test_the_error_names_a_long_option_shortened() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        fs.check_option("ext4", "a" * 200, read_only=True)
    assert "'" + "a" * 60 + "...'" in str(caught.value)


def test_allowed_options_lists_names_and_values() -> None:
    names = fs.allowed_options("btrfs")
    assert {"noatime", "subvol=", "compress", "rescue="} <= set(names)
    assert "suid" not in names and "exec" not in names


# ---- properties -------------------------------------------------------------------------------------------

TYPES = st.sampled_from(sorted(fs.ON_DISK - fs.READ_ONLY_TYPES))
ANY_OPTION = st.one_of(
    st.text(max_size=40),
    st.sampled_from(sorted({*fs.GENERIC, *(n for t in fs.PER_FS.values() for n in t)})),
    st.builds(lambda a, b: f"{a}={b}", st.sampled_from(sorted({n for t in fs.PER_FS.values() for n in t})),
              st.text(max_size=12)),
)


@settings(max_examples=600, deadline=None)
@given(fstype=TYPES, read_only=st.booleans(), requested=st.lists(ANY_OPTION, max_size=5),
       owner=st.integers(0, 2**31 - 2))
def test_whatever_is_asked_the_result_is_safe(fstype: str, read_only: bool, requested: list[str],
                                              owner: int) -> None:
    try:
        options = fs.mount_options(fstype, read_only=read_only, requested=requested, owner_uid=owner,
                                   owner_gid=owner)
    except InvalidArgumentError as exc:
        assert str(exc) and "\n" not in str(exc)  # one line, whatever the input
        return
    assert ",".join(options).split(",") == options  # each option is one token
    assert all(o and o.isprintable() and not set(o) & set(fs.BAD_CHARS) for o in options)
    assert options[:3] == ["ro" if read_only else "rw", "nosuid", "nodev"]
    assert ("rw" if read_only else "ro") not in options
    assert not {"suid", "dev", "exec", "defaults"} & set(options)
    assert all(o.split("=")[0] not in fs.RESERVED or o in (f"uid={owner}", f"gid={owner}") for o in options)
    if read_only and fstype in fs.NO_REPLAY:
        assert fs.NO_REPLAY[fstype] in options


@settings(max_examples=300, deadline=None)
@given(fstype=TYPES, option=st.sampled_from(sorted(fs.GENERIC)), rest=st.text(max_size=20))
def test_nothing_can_be_smuggled_after_an_allowed_option(fstype: str, option: str, rest: str) -> None:
    for glue in (",", "\n", "\0"):
        with pytest.raises(InvalidArgumentError):
            fs.mount_options(fstype, read_only=True, requested=[option + glue + rest], owner_uid=0)
