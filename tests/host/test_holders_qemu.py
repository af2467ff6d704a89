"""Who holds an image, checked against real QEMU VMs and real processes: the state AND the pid.

Every VM is a real ``qemu-system-x86_64`` (a paused PC with virtio-blk devices, see tests/support/vms.py),
waited for by its QMP answer and killed in teardown.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.errors import InUseError, InvalidImageError, NotFoundError
from mountd.host import holders
from mountd.host.holders import (
    FREE,
    READ_ONLY,
    READ_WRITE,
    WRITE_BYTE,
    FileUsage,
    Flock,
    ImageInUseError,
    check_not_in_use,
    file_usage,
    files_usage,
    pack_flock,
    probe_lock_bytes,
)
from tests.support.vms import process_holding, running_vm

QEMU = "qemu-system-x86_64"
F_OFD_SETLK = 37


@pytest.fixture
def raw(workdir: Path) -> Path:
    return images.blank(workdir / "disk.raw", 16 * images.MiB)


@pytest.fixture
def qcow2(workdir: Path) -> Path:
    path = workdir / "disk.qcow2"
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"])
    return path


def overlay(base: Path, name: str) -> Path:
    path = base.parent / name
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(path)])
    return path


def who(usage: FileUsage) -> list[tuple[int, str, bool]]:
    return [(h.pid, h.program, h.writable) for h in usage.holders]


def test_vm_holding_a_raw_image_read_write(raw: Path) -> None:
    with running_vm(f"file={raw},format=raw") as vm:
        usage = file_usage(str(raw))
    assert usage.state == READ_WRITE
    assert usage.locked and WRITE_BYTE in usage.lock_bytes
    assert who(usage) == [(vm.pid, QEMU, True)]
    assert usage.holders[0].lock_bytes == usage.lock_bytes
    assert usage.describe() == f"in use read-write by {QEMU}, pid {vm.pid}"
    assert file_usage(str(raw)).state == FREE  # the VM is gone, and so are its locks


def test_vm_holding_a_qcow2_read_only(qcow2: Path) -> None:
    with running_vm(f"file={qcow2},format=qcow2,readonly=on") as vm:
        usage = file_usage(str(qcow2))
    assert usage.state == READ_ONLY
    assert usage.locked and WRITE_BYTE not in usage.lock_bytes
    assert who(usage) == [(vm.pid, QEMU, False)]
    assert usage.describe() == f"in use read-only by {QEMU}, pid {vm.pid}"


def test_running_overlay_vm(raw: Path) -> None:
    top = overlay(raw, "overlay.qcow2")
    with running_vm(f"file={top},format=qcow2") as vm:
        top_usage, base_usage = files_usage([str(top), str(raw)])
    assert (top_usage.state, who(top_usage)) == (READ_WRITE, [(vm.pid, QEMU, True)])
    assert (base_usage.state, who(base_usage)) == (READ_ONLY, [(vm.pid, QEMU, False)])
    assert base_usage.locked and WRITE_BYTE not in base_usage.lock_bytes


def test_vm_without_locking_is_seen_through_proc(raw: Path) -> None:
    with running_vm(f"file={raw},format=raw,file.locking=off") as vm:
        usage = file_usage(str(raw))
    assert (usage.state, usage.locked) == (READ_WRITE, False)
    assert who(usage) == [(vm.pid, QEMU, True)]


def test_plain_process_holding_the_file_read_write(raw: Path) -> None:
    with process_holding(raw, ["O_RDWR"]) as proc:
        usage = file_usage(str(raw))
    assert (usage.state, usage.locked) == (READ_WRITE, False)
    [holder] = usage.holders
    assert (holder.pid, holder.writable) == (proc.pid, True)
    assert holder.program.startswith("python3")
    assert usage.describe() == f"in use read-write by {holder.program}, pid {proc.pid}"


def test_plain_process_holding_a_block_device(raw: Path) -> None:
    with images.loop(raw) as dev, process_holding(Path(dev), ["O_RDONLY"]) as proc:
        usage = file_usage(dev)
    assert usage.state == READ_ONLY
    assert [h.pid for h in usage.holders] == [proc.pid]


def test_free_file(raw: Path) -> None:
    usage = file_usage(str(raw))
    assert usage == FileUsage(str(raw), FREE, False, ())
    assert usage.describe() == "free"


def test_ignored_pids_and_their_locks_do_not_count(raw: Path) -> None:
    with running_vm(f"file={raw},format=raw") as vm:
        usage = file_usage(str(raw), ignore_pids=[vm.pid])
    assert usage == FileUsage(str(raw), FREE, False, ())


def test_ignoring_one_reader_still_sees_the_other(qcow2: Path) -> None:
    drive = f"file={qcow2},format=qcow2,readonly=on"
    with running_vm(drive) as ours, running_vm(drive) as theirs:
        usage = file_usage(str(qcow2), ignore_pids=[ours.pid])
    assert (usage.state, usage.locked) == (READ_ONLY, True)
    assert who(usage) == [(theirs.pid, QEMU, False)]


def test_probe_sees_locks_through_a_read_only_fd_and_takes_none(raw: Path) -> None:
    holder = os.open(raw, os.O_RDWR | os.O_CLOEXEC)
    probe = os.open(raw, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for l_type, byte in ((fcntl.F_RDLCK, 100), (fcntl.F_WRLCK, 101), (fcntl.F_RDLCK, 201)):
            fcntl.fcntl(holder, F_OFD_SETLK, pack_flock(Flock(l_type, os.SEEK_SET, byte, 1, 0)))
        before = _locks_on(raw)
        assert probe_lock_bytes(probe) == {100, 101, 201}
        assert _locks_on(raw) == before and len(before) == 3
        # Our own process never counts, its locks neither.
        assert file_usage(str(raw)).state == FREE
    finally:
        os.close(probe)
        os.close(holder)
    assert _locks_on(raw) == []


def _locks_on(path: Path) -> list[str]:
    st = os.stat(path)
    tag = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    return [line for line in Path("/proc/locks").read_text().splitlines() if tag in line]


def test_refuses_any_mount_of_an_image_in_use_read_write(raw: Path) -> None:
    with running_vm(f"file={raw},format=raw") as vm:
        for read_write in (False, True):
            with pytest.raises(ImageInUseError) as caught:
                check_not_in_use([str(raw)], read_write=read_write)
            assert str(caught.value) == (
                f"image {raw} is in use read-write by {QEMU}, pid {vm.pid}: stop that VM first")
    assert isinstance(caught.value, InUseError)
    assert caught.value.usage.path == str(raw)


def test_refuses_a_read_write_mount_of_an_image_in_use_read_only(qcow2: Path) -> None:
    with running_vm(f"file={qcow2},format=qcow2,readonly=on") as vm:
        with pytest.raises(ImageInUseError) as caught:
            check_not_in_use([str(qcow2)], read_write=True)
        check_not_in_use([str(qcow2)], read_write=False)  # read-only over read-only is fine
    assert str(caught.value) == (
        f"image {qcow2} is in use read-only by {QEMU}, pid {vm.pid}: stop that VM or mount read-only")


def test_a_backing_file_in_use_read_only_blocks_nothing(raw: Path) -> None:
    running, ours = overlay(raw, "running.qcow2"), overlay(raw, "ours.qcow2")
    with running_vm(f"file={running},format=qcow2"):
        for read_write in (False, True):
            check_not_in_use([str(ours), str(raw)], read_write=read_write)


def test_refuses_a_chain_whose_backing_file_is_in_use_read_write(raw: Path) -> None:
    ours = overlay(raw, "ours.qcow2")
    with process_holding(raw, ["O_RDWR"]) as proc, pytest.raises(ImageInUseError) as caught:
        check_not_in_use([str(ours), str(raw)], read_write=False)
    program = caught.value.usage.holders[0].program
    assert str(caught.value) == (f"backing file {raw} of image {ours} is in use read-write by {program}, "
                                 f"pid {proc.pid}: stop that process first")


def test_a_symlink_is_resolved_to_the_file_it_names(raw: Path, workdir: Path) -> None:
    link = workdir / "link.img"
    link.symlink_to(raw)
    with process_holding(raw, ["O_RDWR"]) as proc:
        usage = file_usage(str(link))
    assert usage.path == str(raw)
    assert [h.pid for h in usage.holders] == [proc.pid]


def test_what_is_not_an_image_file_is_refused_without_hanging(workdir: Path) -> None:
    dangling = workdir / "dangling"
    dangling.symlink_to(workdir / "missing")
    with pytest.raises(NotFoundError, match="does not exist"):
        file_usage(str(dangling))
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, workdir):
        with pytest.raises(InvalidImageError, match="not a regular file or a block device"):
            file_usage(str(path))


def test_scan_tolerates_processes_coming_and_going(raw: Path) -> None:
    # A shell starts short-lived readers of the image while we scan: processes and fds vanish mid-scan.
    loop = f"while :; do head -c1 {raw} >/dev/null; done"
    with running_vm(f"file={raw},format=raw,readonly=on") as vm:
        churn = subprocess.Popen(["sh", "-c", loop], start_new_session=True)
        try:
            usages = [file_usage(str(raw)) for _ in range(30)]
        finally:
            os.killpg(churn.pid, signal.SIGKILL)
            churn.wait()
    for usage in usages:
        assert usage.state == READ_ONLY
        assert (vm.pid, QEMU, False) in who(usage)
        assert all(h.program == "head" and not h.writable for h in usage.holders if h.pid != vm.pid)


def test_a_process_that_let_go_since_the_scan_is_no_holder(raw: Path) -> None:
    """The scan saw a program we were starting hold a copy of one of our descriptors; by the time it is
    named, its exec has closed the copy. An exec cannot be timed into that window on demand, so the scan's
    result is given (a fake scan, named as such) about real processes: one that no longer has the file open,
    and, as the control, one that has."""
    target = holders._open_target(str(raw), {})
    with subprocess.Popen(["sleep", "60"]) as let_go, process_holding(raw, ["O_RDWR"]) as holding:
        try:
            seen = {pid: [holders.FdInfo(os.O_RDWR, frozenset())] for pid in (let_go.pid, holding.pid)}
            usage = holders._usage(target, seen, frozenset())
            assert [h.pid for h in usage.holders] == [holding.pid] and usage.state == READ_WRITE
        finally:
            let_go.kill()
