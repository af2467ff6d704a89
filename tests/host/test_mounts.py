"""MountLayer on real loop devices: ext4, xfs, btrfs (and vfat where the kernel has it), read-only without
journal replay, read-write round trips, busy unmounts, mountpoint life cycle; plus the mountinfo parser."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.images import MiB
from mountd.engine.journal import Journal, MountRecord
from mountd.engine.stack import MountStack
from mountd.errors import BusyError, FailedError, InvalidArgumentError, InvalidImageError, UnsupportedError
from mountd.host.filesystems import mount_options, mountable_types
from mountd.host.mountinfo import MountEntry, mountinfo
from mountd.host.users import mountpoint_users
from mountd.layers.layer import FaultPoints, InjectedFault, LayerRecord, LayerState, layer_from_record
from mountd.layers.mount import MountLayer, unique_mountpoint

OWNER = 4242  # no passwd entry: the directory gets gid 0
SIZES = {"ext4": 32 * MiB, "xfs": 64 * MiB, "btrfs": 128 * MiB, "vfat": 32 * MiB}
NO_REPLAY_SHOWN = {"ext4": "norecovery", "xfs": "norecovery", "btrfs": "rescue=nologreplay"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def make_image(path: Path, fstype: str, files: dict[str, bytes] | None = None) -> Path:
    images.blank(path, SIZES[fstype])
    images.format_region(path, 0, SIZES[fstype], fstype, files=files)
    return path


def planned(device: str, mountpoint: str, fstype: str, *, read_only: bool = True,
            requested: Sequence[str] = ()) -> LayerRecord:
    options = mount_options(fstype, read_only=read_only, requested=requested, owner_uid=OWNER)
    return LayerRecord("mount", "vol", LayerState.ATTACHING, {
        "device": device, "mountpoint": mountpoint, "fstype": fstype, "options": options, "owner": OWNER})


@contextlib.contextmanager
def mounted(device: str, root: Path, fstype: str, *, name: str = "vol", read_only: bool = True,
            requested: Sequence[str] = (), journal: list[LayerRecord] | None = None) -> Iterator[MountLayer]:
    layer = MountLayer(planned(device, unique_mountpoint(str(root), name), fstype, read_only=read_only,
                               requested=requested))
    try:
        layer.attach((journal if journal is not None else []).append)
        yield layer
    finally:
        layer.detach(force=True)


def entry_of(layer: MountLayer) -> MountEntry:
    (entry,) = [e for e in mountinfo() if e.mount_id == layer.identity["mount_id"]]
    return entry


# ---- read-only mounts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_read_only_mount_cannot_write_and_replays_nothing(workdir: Path, fstype: str) -> None:
    image = make_image(workdir / f"{fstype}.img", fstype, {"hello.txt": b"hello\n"})
    before = sha256(image)
    journal: list[LayerRecord] = []
    with images.loop(image) as dev, mounted(dev, workdir / "media", fstype, journal=journal) as layer:
        mountpoint = Path(layer.mountpoint)
        assert (mountpoint / "hello.txt").read_bytes() == b"hello\n"
        with pytest.raises(OSError) as caught:
            (mountpoint / "new.txt").write_bytes(b"x")
        assert caught.value.errno == errno.EROFS
        entry = entry_of(layer)
        assert {"ro", "nosuid", "nodev"} <= set(entry.options)
        assert NO_REPLAY_SHOWN[fstype] in entry.super_options
        assert (entry.source, entry.fstype, entry.mountpoint) == (dev, fstype, str(mountpoint))
        ident = layer.identity
        assert (ident["node"], ident["dev"], ident["mount_id"]) == (str(mountpoint), entry.dev, entry.mount_id)
        assert layer.record.state == "attached" and layer.verify()
        # The journal heard that we made the directory before the mount existed.
        assert journal[0].identity["created"] is True and journal[0].state == "attaching"
    assert not mountpoint.exists()
    assert sha256(image) == before


def dirty(image: Path, fstype: str) -> None:
    """Leave a journal (ext4) or log (xfs) that needs replaying: write, commit, then shut the filesystem
    down without flushing the log (the ioctl behind ``xfs_io shutdown``, which ext4 implements too)."""
    with images.loop(image) as dev, images.mounted(dev) as mnt:
        for i in range(20):
            (mnt / f"file{i}").write_bytes(b"data %d\n" % i)
        os.sync()
        (mnt / "after-sync").write_bytes(b"only in the journal\n")
        images.run(["xfs_io", "-x", "-c", "shutdown", str(mnt)])


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_journal_that_needs_recovery_is_not_replayed(workdir: Path, fstype: str) -> None:
    image = make_image(workdir / f"{fstype}.img", fstype)
    dirty(image, fstype)
    if fstype == "ext4":
        assert "needs_recovery" in images.run(["dumpe2fs", "-h", str(image)])
    before = sha256(image)
    # A writable loop device, so only the mount option stands between the driver and the image.
    with images.loop(image) as dev, mounted(dev, workdir / "media", fstype) as layer:
        names = os.listdir(layer.mountpoint)  # xfs: what only the log holds is not there, and that is fine
        assert fstype != "ext4" or "file0" in names
        assert NO_REPLAY_SHOWN[fstype] in entry_of(layer).super_options
    assert sha256(image) == before
    # Control: the same read-only mount without the option replays, and so writes to the image.
    control = workdir / "control.img"
    shutil.copyfile(image, control)
    with images.loop(control) as dev, images.mounted(dev, read_only=True):
        pass
    assert sha256(control) != before


# ---- read-write -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_read_write_round_trip(workdir: Path, fstype: str) -> None:
    image = make_image(workdir / f"{fstype}.img", fstype)
    data = os.urandom(8 * MiB)
    with images.loop(image) as dev:
        with mounted(dev, workdir / "media", fstype, read_only=False, requested=["noatime"]) as layer:
            entry = entry_of(layer)
            assert {"rw", "nosuid", "nodev", "noatime"} <= set(entry.options)
            assert NO_REPLAY_SHOWN[fstype] not in entry.super_options
            (Path(layer.mountpoint) / "sub").mkdir()
            (Path(layer.mountpoint) / "sub" / "blob").write_bytes(data)
        # Detached with the loop device still attached: syncfs + umount must have put the data on it.
        with mounted(dev, workdir / "media", fstype) as layer:
            got = (Path(layer.mountpoint) / "sub" / "blob").read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            # Only our directory was given to the owner; the filesystem's root is untouched.
            assert os.stat(layer.mountpoint).st_uid == 0


def test_read_write_on_a_read_only_device_is_refused_clearly(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4")
    with images.loop(image, read_only=True) as dev:
        layer = MountLayer(planned(dev, str(workdir / "media" / "vol"), "ext4", read_only=False))
        with pytest.raises(InvalidArgumentError, match=fr"ext4 filesystem on {dev} \(volume vol\) can "
                                                       "only be mounted read-only"):
            layer.attach(lambda rec: None)
        assert not (workdir / "media" / "vol").exists()
        layer.detach()


def test_a_damaged_filesystem_is_an_invalid_image(workdir: Path) -> None:
    image = images.blank(workdir / "zeros.img", 16 * MiB)
    with open(image, "r+b") as f:
        f.write(os.urandom(2 * MiB))
    with images.loop(image) as dev:
        layer = MountLayer(planned(dev, str(workdir / "media" / "vol"), "xfs"))
        with pytest.raises(InvalidImageError, match=fr"xfs filesystem on {dev} \(volume vol\) cannot be mounted.*xfs_repair"):
            layer.attach(lambda rec: None)
        assert not (workdir / "media" / "vol").exists()
        layer.detach()


def test_vfat_is_mounted_for_its_owner_or_refused_naming_the_module(workdir: Path) -> None:
    can = "vfat" in mountable_types()  # not on this development kernel: no vfat, no modules
    image = make_image(workdir / "vfat.img", "vfat", {"readme.txt": b"fat\n"} if can else None)
    with images.loop(image) as dev:
        if not can:
            layer = MountLayer(planned(dev, str(workdir / "media" / "vol"), "vfat"))
            with pytest.raises(UnsupportedError, match=r"cannot mount vfat filesystems: .*module vfat"):
                layer.attach(lambda rec: None)
            assert not (workdir / "media").exists()
            return
        with mounted(dev, workdir / "media", "vfat") as layer:
            readme = Path(layer.mountpoint) / "readme.txt"
            assert readme.stat().st_uid == OWNER
            with pytest.raises(OSError) as caught:
                readme.write_bytes(b"x")
            assert caught.value.errno == errno.EROFS


# ---- busy, forced and repeated unmounts -------------------------------------------------------------------


def test_busy_unmount_names_the_process_and_force_is_lazy(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4", {"f": b"still here\n"})
    with images.loop(image) as dev, mounted(dev, workdir / "media", "ext4", read_only=False) as layer:
        inside = subprocess.Popen(["cat"], cwd=layer.mountpoint, stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL)
        try:
            with pytest.raises(BusyError) as caught:
                layer.detach()
            assert f"cat, pid {inside.pid} (working directory)" in str(caught.value)
            assert layer.mountpoint in str(caught.value)
            # Nothing changed: still mounted, still ours, still readable.
            assert layer.verify()
            assert (Path(layer.mountpoint) / "f").read_bytes() == b"still here\n"
            assert [u.pid for u in mountpoint_users(layer.mountpoint)] == [inside.pid]
            layer.detach(force=True)
            assert not any(e.mountpoint == layer.mountpoint for e in mountinfo())
            assert not os.path.exists(layer.mountpoint)
            assert not layer.verify()
        finally:
            assert inside.stdin is not None
            inside.stdin.close()
            inside.wait()


def test_a_loop_device_on_a_file_inside_keeps_it_busy(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4")
    with images.loop(image) as dev, mounted(dev, workdir / "media", "ext4", read_only=False) as layer:
        inner = images.blank(Path(layer.mountpoint) / "inner.img", MiB)
        with images.loop(inner) as inner_dev:
            with pytest.raises(BusyError, match=f"in use by loop device {inner_dev}"):
                layer.detach()
            assert layer.verify()
        layer.detach()
        assert not layer.verify()


def test_users_of_sees_open_and_mapped_files(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4", {"data": b"x" * 8192})
    with images.loop(image) as dev, mounted(dev, workdir / "media", "ext4") as layer:
        target = Path(layer.mountpoint) / "data"
        # libc mmap, then close the fd: Python's mmap module would keep a duplicate fd open.
        script = ("import ctypes, os, sys; libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p; "
                  "libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, "
                  "ctypes.c_int, ctypes.c_long); fd = os.open(sys.argv[1], os.O_RDONLY); "
                  "assert libc.mmap(None, 8192, 1, 1, fd, 0) not in (None, 2**64 - 1); os.close(fd); "
                  "print('ready', flush=True); sys.stdin.read()")
        with open(target, "rb") as held:
            opener = subprocess.Popen(["sleep", "infinity"], stdin=held)
        mapper = subprocess.Popen(["python3", "-c", script, str(target)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert mapper.stdout is not None and mapper.stdout.readline() == "ready\n"
            found = {u.pid: (u.program, u.how) for u in mountpoint_users(layer.mountpoint)}
            assert found[opener.pid] == ("sleep", "open file")
            assert found[mapper.pid][1] == "mapped file"
        finally:
            for proc in (opener, mapper):
                proc.kill()
                proc.wait()


def test_detach_is_idempotent_and_survives_a_crash_mid_attach(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4")
    with images.loop(image) as dev:
        with mounted(dev, workdir / "media", "ext4") as layer:
            pass
        layer.detach()
        layer.detach(force=True)

        # Injected crash: the journal holds only the first progress record (directory made, not mounted).
        journal: list[LayerRecord] = []
        doomed = MountLayer(planned(dev, str(workdir / "media" / "crash"), "ext4"))

        def crash(record: LayerRecord) -> None:
            journal.append(record)
            raise KeyboardInterrupt  # stands in for the daemon dying right after journalling

        with pytest.raises(KeyboardInterrupt):
            doomed.attach(crash)
        assert not (workdir / "media" / "crash").exists()  # attach cleaned up after itself
        os.mkdir(workdir / "media" / "crash")  # ... as if it had not had the chance to
        layer_from_record(journal[0]).detach()
        assert not (workdir / "media" / "crash").exists()

        # Injected crash after the mount, before its identity was journalled: the record still says
        # "attaching" without a mount id. Detach finds the mount by device, type and path.
        survivor = MountLayer(planned(dev, str(workdir / "media" / "late"), "ext4"))
        half = survivor.attach(lambda rec: None)
        stale = LayerRecord("mount", "vol", LayerState.ATTACHING,
                            {k: v for k, v in half.identity.items() if k not in ("mount_id", "dev", "node")})
        assert not layer_from_record(stale).verify()
        layer_from_record(stale).detach()
        assert not any(e.source == dev for e in mountinfo())
        assert not (workdir / "media" / "late").exists()


@pytest.mark.parametrize("fault_at", [1, 2])  # injected: before the mount step, and right after it
def test_a_fault_in_the_stack_leaves_nothing(workdir: Path,
                                             fault_at: int) -> None:
    image = make_image(workdir / "ext4.img", "ext4")
    journal = Journal(str(workdir / "state"))
    with images.loop(image) as dev:
        record = MountRecord("m1", str(image), "raw", True, OWNER, "loop", {})
        stack = MountStack(journal, record, FaultPoints(fail_at=fault_at))
        with pytest.raises(InjectedFault), stack.building():
            stack.push(planned(dev, str(workdir / "media" / "vol"), "ext4"))
        assert not any(e.source == dev for e in mountinfo())
    assert not (workdir / "media" / "vol").exists()
    assert journal.all() == []


# ---- mountpoints ------------------------------------------------------------------------------------------


def test_the_mountpoint_is_made_for_the_owner_and_removed(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4")
    media = workdir / "media"
    with images.loop(image) as dev:
        layer = MountLayer(planned(dev, str(media / "vol"), "ext4"))
        seen: list[os.stat_result] = []
        layer.attach(lambda rec: seen.append(os.stat(rec.identity["mountpoint"])))
        try:
            assert stat.S_IMODE(seen[0].st_mode) == 0o700
            assert {e.mountpoint for e in mountinfo()} >= {str(media / "vol")}
            assert os.stat(media / "vol").st_ino != seen[0].st_ino  # now the filesystem's root
        finally:
            layer.detach()
        assert not (media / "vol").exists()
        assert media.is_dir()  # the mount root stays


def test_an_existing_directory(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4")
    media = workdir / "media"
    (media / "empty").mkdir(parents=True)
    (media / "full").mkdir()
    (media / "full" / "precious").write_bytes(b"keep me\n")
    with images.loop(image) as dev:
        with pytest.raises(InvalidArgumentError, match="already exists and is not an empty directory"):
            MountLayer(planned(dev, str(media / "full"), "ext4")).attach(lambda rec: None)
        assert (media / "full" / "precious").read_bytes() == b"keep me\n"
        layer = MountLayer(planned(dev, str(media / "empty"), "ext4"))
        layer.attach(lambda rec: None)
        assert layer.verify()
        layer.detach()
        assert (media / "empty").is_dir()  # not ours: left in place


def test_a_mount_root_others_can_write_is_refused(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4")
    unsafe = workdir / "unsafe"
    unsafe.mkdir()
    os.chown(unsafe, OWNER, OWNER)
    with images.loop(image) as dev, pytest.raises(InvalidArgumentError,
                                                 match=f"{unsafe} .* can be changed by users other than root"):
        MountLayer(planned(dev, str(unsafe / "vol"), "ext4")).attach(lambda rec: None)
    assert os.listdir(unsafe) == []


def test_a_device_given_by_a_symlink_is_refused(workdir: Path) -> None:
    """mount(8) resolves it, so mountinfo would not name our device as we do (only /dev/mapper/NAME, udev's
    symlink to a device-mapper device, is shown as given: the VM lane mounts LVs through it)."""
    image = make_image(workdir / "ext4.img", "ext4")
    link = workdir / "disk"
    with images.loop(image) as dev:
        link.symlink_to(dev)
        with pytest.raises(InvalidArgumentError, match=f"the device {link} is a symlink"):
            MountLayer(planned(str(link), str(workdir / "media" / "vol"), "ext4")).attach(lambda rec: None)
    assert not (workdir / "media" / "vol").exists()


def test_awkward_names_round_trip_through_mountinfo(workdir: Path) -> None:
    image = make_image(workdir / "ext4.img", "ext4")
    with images.loop(image) as dev:
        for name in ("my disk", "tab\there", "back\\slash", "new\nline", "ünïcode ✓"):
            with mounted(dev, workdir / "media", "ext4", name=name) as layer:
                assert os.path.dirname(layer.mountpoint) == str(workdir / "media")
                assert entry_of(layer).mountpoint == layer.mountpoint
                assert layer.verify()
    assert os.listdir(workdir / "media") == []


def test_unique_mountpoint(workdir: Path) -> None:
    root = str(workdir)
    assert unique_mountpoint(root, "disk") == f"{root}/disk"
    (workdir / "disk").mkdir()
    (workdir / "disk-2").write_bytes(b"")
    os.symlink("/nonexistent", workdir / "disk-3")  # a dangling symlink is taken too
    assert unique_mountpoint(root, "disk") == f"{root}/disk-4"
    assert unique_mountpoint(root + "/", "../etc/passwd") == f"{root}/_etc_passwd"
    assert unique_mountpoint(root, "...") == f"{root}/volume"
    assert unique_mountpoint(root, "a\x00b\nc") == f"{root}/a_b_c"
    long = unique_mountpoint(root, "é" * 300)
    assert len(os.path.basename(long).encode()) == 200
    with pytest.raises(InvalidArgumentError, match="not an absolute path"):
        unique_mountpoint("relative", "x")
    for n in range(2, 1001):
        (workdir / f"full-{n}").mkdir()
    (workdir / "full").mkdir()
    with pytest.raises(FailedError, match="every name from full to full-1000"):
        unique_mountpoint(root, "full")
