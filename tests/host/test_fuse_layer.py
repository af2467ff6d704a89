"""The FUSE export layer with a real ``qemu-storage-daemon``: a qcow2 GPT disk exported as a raw file, a loop
device at the partition's offset on it, a real ext4 mount; write-back, daemon survival and crash cleanup."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import shutil
import signal
from pathlib import Path

import pytest

import mountd.layers.fuse
import mountd.layers.loop
from imgmount_testkit import images
from mountd.engine.journal import Journal, MountRecord
from mountd.engine.stack import MountStack
from mountd.errors import BusyError, InUseError, InvalidImageError, UnsupportedError
from mountd.host.loopdev import loops_backed_by
from mountd.host.mountinfo import mountinfo
from mountd.layers.layer import FaultPoints, InjectedFault, LayerRecord, LayerState, layer_from_record
from tests.support.layers import attach_in_child, attached, planned
from tests.support.vms import running_vm

MiB = images.MiB
DISK, PART_START, PART_SIZE = 128 * MiB, 1 * MiB, 120 * MiB
HELLO = b"hello from inside a qcow2 partition\n"
assert mountd.layers.fuse and mountd.layers.loop  # register the "fuse" and "loop" kinds for layer_from_record


@pytest.fixture(scope="module")
def base_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT disk with one ext4 partition holding hello.txt, as qcow2 (built once, copied per test)."""
    work = tmp_path_factory.mktemp("fuse-base")
    raw = images.blank(work / "disk.raw", DISK)
    images.partition(raw, f"label: gpt\nstart={PART_START // 512}, size={PART_SIZE // 512}, type=linux\n")
    images.format_region(raw, PART_START, PART_SIZE, "ext4", files={"hello.txt": HELLO})
    return images.convert(raw, work / "disk.qcow2", "qcow2")


@pytest.fixture
def qcow2(base_qcow2: Path, workdir: Path) -> Path:
    return Path(shutil.copy(base_qcow2, workdir / "disk.qcow2"))


def fuse_plan(image: Path, *, read_only: bool = True, snapshot: str | None = None,
              **extra: object) -> LayerRecord:
    blockdev = f"driver=qcow2,file.driver=file,file.filename={image}"
    return planned("fuse", blockdev=blockdev, export=str(image.parent / "export.raw"), read_only=read_only,
                   snapshot=snapshot, **extra)


def part_plan(export: str, *, read_only: bool = True) -> LayerRecord:
    return planned("loop", backing=export, offset=PART_START, size=PART_SIZE, read_only=read_only,
                   qemu_locks=False)


def writable(path: str) -> bool:
    """Whether a byte can be written (the export refuses at open or at write, depending on timing)."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            return os.pwrite(fd, b"x", 0) == 1
        finally:
            os.close(fd)
    except PermissionError:
        return False


def nothing_left(export: str) -> bool:
    return not (os.path.exists(export) or os.path.exists(f"{export}.pid") or loops_backed_by(export)
                or any(m.mountpoint == export for m in mountinfo()))


def test_read_only_export_with_a_partition_loop_on_top(qcow2: Path) -> None:
    with attached(fuse_plan(qcow2, virtual_size=DISK)) as disk:
        assert disk.verify()
        assert os.stat(disk.node).st_size == DISK
        assert (os.stat(disk.node).st_mode & 0o777) == 0o400  # writable=off, and no other user
        with attached(part_plan(disk.node)) as part:
            with pytest.raises(BusyError, match=part.node):
                disk.detach()  # the engine detaches the loop device first
            assert disk.verify()
            with images.mounted(part.node, read_only=True) as mnt:
                assert (mnt / "hello.txt").read_bytes() == HELLO
            assert not writable(disk.node)  # read-only at this level too
    assert nothing_left(disk.node)


def test_read_write_round_trip_of_64_mib(qcow2: Path) -> None:
    data = os.urandom(64 * MiB)
    with attached(fuse_plan(qcow2, read_only=False)) as disk, \
            attached(part_plan(disk.node, read_only=False)) as part, images.mounted(part.node) as mnt:
        (mnt / "big.bin").write_bytes(data)
    check = images.run(["qemu-img", "check", "-f", "qcow2", str(qcow2)])
    assert "No errors were found" in check
    with attached(fuse_plan(qcow2)) as disk, attached(part_plan(disk.node)) as part, \
            images.mounted(part.node, read_only=True) as mnt:
        assert hashlib.sha256((mnt / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        assert (mnt / "hello.txt").read_bytes() == HELLO


def test_the_daemon_outlives_the_process_that_started_it(qcow2: Path) -> None:
    record = attach_in_child(fuse_plan(qcow2))
    layer = layer_from_record(record)
    try:
        assert layer.verify()
        assert os.getsid(record.identity["pid"]) != os.getsid(0)  # its own session: our ^C never reaches it
        with open(layer.node, "rb") as f:
            f.seek(512)
            assert f.read(8) == b"EFI PART"
    finally:
        layer.detach()
    assert not layer.verify()
    assert nothing_left(layer.node)


def test_a_killed_daemon_leaves_a_dead_mount_that_detach_cleans(qcow2: Path) -> None:
    with attached(fuse_plan(qcow2)) as layer:
        pid = layer.identity["pid"]
        pidfd = os.pidfd_open(pid)
        try:
            os.kill(pid, signal.SIGKILL)
            assert select.select([pidfd], [], [], 30)[0]
        finally:
            os.close(pidfd)
        assert not layer.verify()
        with pytest.raises(OSError) as err:
            os.open(layer.node, os.O_RDONLY)  # stat may still answer from the attribute cache
        assert err.value.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
        layer.detach()
        assert nothing_left(layer.node)
        layer.detach()  # idempotent


def test_a_loop_device_on_a_killed_daemon_still_comes_off(qcow2: Path) -> None:
    """The kernel cannot stat a dead export, so the loop layer knows its device by sysfs alone."""
    with attached(fuse_plan(qcow2)) as disk, attached(part_plan(disk.node)) as part:
        os.kill(disk.identity["pid"], signal.SIGKILL)
        pidfd = os.pidfd_open(disk.identity["pid"])
        try:
            assert select.select([pidfd], [], [], 30)[0]
        finally:
            os.close(pidfd)
        assert not disk.verify()
        part.detach()
        assert not loops_backed_by(disk.node)
        disk.detach()
    assert nothing_left(disk.node)


def test_detach_of_a_plan_never_attached(qcow2: Path) -> None:
    layer = layer_from_record(fuse_plan(qcow2))
    layer.detach()
    layer.detach()
    assert nothing_left(str(qcow2.parent / "export.raw"))


def test_internal_snapshots_are_left_to_nbd(qcow2: Path) -> None:
    with pytest.raises(UnsupportedError, match="--backend nbd"):
        layer_from_record(fuse_plan(qcow2, snapshot="before-upgrade")).attach(lambda r: None)
    assert nothing_left(str(qcow2.parent / "export.raw"))


def stack(workdir: Path, faults: FaultPoints | None = None) -> MountStack:
    record = MountRecord("m1", str(workdir / "disk.qcow2"), "qcow2", True, 0, "fuse", {})
    return MountStack(Journal(str(workdir / "state")), record, faults)


def test_image_in_use_by_a_vm_is_refused_and_rolled_back(qcow2: Path, workdir: Path) -> None:
    mounts = stack(workdir)
    with running_vm(f"file={qcow2},format=qcow2") as vm, pytest.raises(InUseError, match=f"pid {vm.pid}"):
        mounts.push(fuse_plan(qcow2))
    assert mounts.record.layers == ()
    assert nothing_left(str(qcow2.parent / "export.raw"))


def test_a_fault_after_the_export_rolls_it_back(qcow2: Path, workdir: Path) -> None:
    mounts = stack(workdir, FaultPoints(fail_at=2))  # step 2: right after the fuse layer attached
    with pytest.raises(InjectedFault):
        mounts.push(fuse_plan(qcow2))
    assert mounts.record.layers == ()
    assert nothing_left(str(qcow2.parent / "export.raw"))


def test_an_image_resized_since_its_plan_is_refused_and_rolled_back(qcow2: Path, workdir: Path) -> None:
    """The plan holds the size inspection read; her rewrite of the header before the export started (the
    boundary test's race, here in order) is an invalid image, not a failure of ours, and leaves nothing."""
    mounts = stack(workdir)
    images.run(["qemu-img", "resize", "-f", "qcow2", str(qcow2), str(DISK + 16 * MiB)])
    with pytest.raises(InvalidImageError, match=f"changed while it was being mounted: QEMU now serves "
                                                 f"{DISK + 16 * MiB} bytes, not the {DISK}"):
        mounts.push(fuse_plan(qcow2, virtual_size=DISK))
    assert mounts.record.layers == ()
    assert nothing_left(str(qcow2.parent / "export.raw"))


def test_a_crash_before_the_pid_was_recorded(qcow2: Path) -> None:
    """The journal may hold only the plan (a crash right after the daemon started): detach finds the daemon
    by the export on its command line."""
    record = attach_in_child(fuse_plan(qcow2))
    plan_only = {k: v for k, v in record.identity.items() if k not in ("pid", "start_time", "node")}
    layer_from_record(LayerRecord("fuse", "", LayerState.ATTACHING, plan_only)).detach()
    assert not layer_from_record(record).verify()
    assert nothing_left(str(record.identity["export"]))
