"""The loop layer on real loop devices: offsets, read-only, sector size, identity, busy detach, and QEMU's
image locks checked against real ``qemu-system-x86_64`` processes (tests/support/vms.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mountd.layers.loop
from imgmount_testkit import images
from mountd.errors import BusyError, InvalidArgumentError
from mountd.host.holders import ImageInUseError
from mountd.host.loopdev import loop_number, loops_backed_by, sysfs_view
from mountd.layers.layer import Layer, LayerRecord, layer_from_record
from mountd.layers.loop import LoopLayer
from tests.support.layers import attach_in_child, attached, planned
from tests.support.vms import process_holding, running_vm

MiB = images.MiB
BLKSSZGET = 0x1268
assert mountd.layers.loop  # registers the "loop" kind for layer_from_record


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


@pytest.fixture
def raw(workdir: Path) -> Path:
    path = images.blank(workdir / "disk.raw", 16 * MiB)
    with open(path, "r+b") as f:
        f.seek(1 * MiB)
        f.write(pattern(4 * MiB, 1))
    return path


def loop_plan(image: Path, *, offset: int = 0, size: int = 0, read_only: bool = True, locks: bool = False,
              **extra: object) -> LayerRecord:
    return planned("loop", backing=str(image), offset=offset, size=size, read_only=read_only, qemu_locks=locks,
                   **extra)


def read_all(node: str) -> bytes:
    with open(node, "rb") as f:
        return f.read()


def number(layer: Layer[Any]) -> int:
    n = loop_number(layer.node)
    assert n is not None
    return n


def test_read_only_at_an_offset(raw: Path) -> None:
    seen: list[LayerRecord] = []
    layer = LoopLayer(loop_plan(raw, offset=1 * MiB, size=4 * MiB))
    try:
        record = layer.attach(seen.append)
        assert record.state == "attached"
        assert seen and seen[0].identity["node"] == record.identity["node"]  # journalled before LOOP_CONFIGURE
        assert read_all(layer.node) == pattern(4 * MiB, 1)
        st = os.stat(raw)
        ident = record.identity
        assert (ident["backing_dev"], ident["backing_ino"]) == (st.st_dev, st.st_ino)
        assert ident["sysfs"]["ro"] and ident["sysfs"]["size_bytes"] == 4 * MiB
        fd = os.open(layer.node, os.O_RDWR)
        try:
            with pytest.raises(OSError) as err:
                os.pwrite(fd, b"x" * 4096, 0)
            assert err.value.errno in (errno.EROFS, errno.EPERM)
        finally:
            os.close(fd)
        assert layer.verify()
    finally:
        layer.detach()
    assert not layer.verify()
    assert raw.read_bytes()[1 * MiB:5 * MiB] == pattern(4 * MiB, 1)


def test_read_write_round_trip_to_the_end(raw: Path) -> None:
    with attached(loop_plan(raw, offset=8 * MiB, read_only=False)) as layer:
        assert layer.identity["sysfs"]["size_bytes"] == 8 * MiB  # size 0: to the end of the file
        fd = os.open(layer.node, os.O_RDWR)
        try:
            os.pwrite(fd, pattern(MiB, 9), 3 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert not loops_backed_by(str(raw))
    assert raw.read_bytes()[11 * MiB:12 * MiB] == pattern(MiB, 9)


def test_4096_byte_sectors(raw: Path) -> None:
    with attached(loop_plan(raw, block_size=4096)) as layer:
        fd = os.open(layer.node, os.O_RDONLY)
        try:
            (sector,) = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))
        finally:
            os.close(fd)
        assert sector == 4096
        assert layer.verify()


def test_bad_plans_attach_nothing(raw: Path) -> None:
    for plan in (loop_plan(raw, offset=16 * MiB), loop_plan(raw, block_size=1000),
                 loop_plan(Path("relative.raw")), loop_plan(raw.parent)):
        with pytest.raises(InvalidArgumentError):
            LoopLayer(plan).attach(lambda r: None)
    assert not loops_backed_by(str(raw))


def test_verify_fails_once_the_number_serves_another_file(raw: Path, workdir: Path) -> None:
    other = images.blank(workdir / "other.raw", 4 * MiB)
    layer = LoopLayer(loop_plan(raw))
    layer.attach(lambda r: None)
    try:
        images.run(["losetup", "--detach", layer.node])  # someone else detaches ours...
        images.run(["losetup", layer.node, str(other)])  # ...and takes the same number for their file
        assert not layer.verify()
        layer.detach()  # not ours any more: left alone
        assert (sysfs_view(number(layer)) or {}).get("backing_file") == str(other)
    finally:
        for node in loops_backed_by(str(other)):  # only ever theirs: other tests may take loop devices too
            images.run(["losetup", "--detach", node])
        layer.detach()


def test_detach_is_idempotent_and_copes_with_a_plan_never_attached(raw: Path) -> None:
    LoopLayer(loop_plan(raw)).detach()  # no node yet: nothing was made
    layer = LoopLayer(loop_plan(raw))
    layer.attach(lambda r: None)
    layer.detach()
    layer.detach()
    assert sysfs_view(number(layer)) is None or not layer.verify()


def test_detach_while_mounted_is_busy_and_changes_nothing(raw: Path) -> None:
    images.format_region(raw, 8 * MiB, 8 * MiB, "ext4")
    with attached(loop_plan(raw, offset=8 * MiB, read_only=False)) as layer:
        with images.mounted(layer.node) as mnt:
            with pytest.raises(BusyError, match=f"mounted on {mnt}"):
                layer.detach()
            assert layer.verify()
            (mnt / "still.txt").write_text("works")
            assert (mnt / "still.txt").read_text() == "works"
            assert (sysfs_view(number(layer)) or {}).get("backing_file") == str(raw)
        layer.detach()
        assert not layer.verify()


def test_detach_while_a_process_has_it_open(raw: Path) -> None:
    layer = LoopLayer(loop_plan(raw))
    layer.attach(lambda r: None)
    try:
        with process_holding(Path(layer.node), ("O_RDONLY",)) as holder:
            with pytest.raises(BusyError, match=f"open by python3[.0-9]*, pid {holder.pid}"):
                layer.detach()
            assert layer.verify()
            # forced: the kernel detaches it at its last close (a warning says so)
            layer.detach(force=True)
            assert sysfs_view(number(layer)) is not None  # still there while the holder has it open
        assert sysfs_view(number(layer)) is None  # the holder closed it: gone
    finally:
        layer.detach()


def forked_holding(node: str, *, exec_when: Callable[[], bool] | None = None, keep: bool = False) -> int:
    """A child of this process, forked while we had ``node`` open (we close our fd at once): between its
    fork and its exec, as a program another thread of the daemon is starting. It execs ``sleep`` once
    ``exec_when()`` holds (polled, 10 s at most), or at once when it is None; the exec closes the copy
    (O_CLOEXEC) unless ``keep``. Killed by the caller."""
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # only os calls here: other threads' locks are not ours to take
        deadline = time.monotonic() + 10
        while exec_when is not None and not exec_when() and time.monotonic() < deadline:
            os.sched_yield()
        os.set_inheritable(fd, keep)
        os.execv("/bin/sleep", ["sleep", "60"])
    os.close(fd)
    return pid


def autoclear_set(layer: Layer[Any]) -> Callable[[], bool]:
    """LOOP_CLR_FD on a device that is open elsewhere sets autoclear: the clear waits for the last close."""
    flag = Path(f"/sys/block/loop{number(layer)}/loop/autoclear")
    return lambda: flag.read_text().strip() == "1"


def reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_a_program_being_started_is_no_user_of_what_it_inherited(raw: Path) -> None:
    # The daemon's race (issue 9, seen again in CI): a thread starts a program while another has the device
    # open for a moment; until its exec the child holds a copy of that fd, closed in the daemon since.
    layer = LoopLayer(loop_plan(raw))
    layer.attach(lambda r: None)
    child = forked_holding(layer.node, exec_when=autoclear_set(layer))
    try:
        layer.detach()  # the child execs (closing the copy) once our clear waits for the last close
        assert sysfs_view(number(layer)) is None
    finally:
        reap(child)
        layer.detach()


def test_the_same_program_after_its_exec_is_a_user(raw: Path) -> None:
    layer = LoopLayer(loop_plan(raw))
    layer.attach(lambda r: None)
    child = forked_holding(layer.node, keep=True)
    try:
        mountd.layers.loop.wait_until(lambda: os.readlink(f"/proc/{child}/exe").endswith("/sleep"), 10, "its exec")
        with pytest.raises(BusyError, match=f"open by sleep, pid {child}"):
            layer.detach()
        assert layer.verify()
    finally:
        reap(child)
        layer.detach()


def vm_refusal(drive: str) -> str:
    """Start a real VM on ``drive``, which must fail; QEMU's complaint."""
    with pytest.raises(RuntimeError) as err, running_vm(drive):
        pass
    return str(err.value)


def test_read_only_hold_blocks_a_read_write_vm(raw: Path) -> None:
    with attached(loop_plan(raw, locks=True)):
        assert 'Failed to get "write" lock' in vm_refusal(f"file={raw},format=raw")
        with running_vm(f"file={raw},format=raw,readonly=on"):
            pass  # readers share: a read-only VM may start
    with running_vm(f"file={raw},format=raw"):
        pass  # and a read-write one once we let go


def test_read_write_hold_blocks_any_vm(raw: Path) -> None:
    with attached(loop_plan(raw, read_only=False, locks=True)):
        assert "lock" in vm_refusal(f"file={raw},format=raw")
        assert "lock" in vm_refusal(f"file={raw},format=raw,readonly=on")
    with running_vm(f"file={raw},format=raw,readonly=on"):
        pass


def test_image_in_use_by_a_vm_is_refused_with_its_pid(raw: Path) -> None:
    with running_vm(f"file={raw},format=raw") as vm:
        for read_only in (True, False):
            with pytest.raises(ImageInUseError, match=f"qemu-system-x86_64, pid {vm.pid}"):
                LoopLayer(loop_plan(raw, read_only=read_only, locks=True)).attach(lambda r: None)
        assert loops_backed_by(str(raw)) == []


def test_the_locks_outlive_the_process_that_attached(raw: Path) -> None:
    record = attach_in_child(loop_plan(raw, locks=True))
    layer = layer_from_record(record)
    try:
        assert layer.verify()
        assert 'Failed to get "write" lock' in vm_refusal(f"file={raw},format=raw")
    finally:
        layer.detach()
    assert not layer.verify()
    with running_vm(f"file={raw},format=raw"):
        pass


LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81


def test_a_missing_device_node_is_made_from_sysfs() -> None:
    """A static /dev (containers) lacks the node of a device the kernel just made: we mknod it."""
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    try:
        n = next(n for n in range(200, 256) if not Path(f"/sys/block/loop{n}").exists())
        fcntl.ioctl(ctl, LOOP_CTL_ADD, n)
        try:
            os.unlink(f"/dev/loop{n}")
            assert mountd.layers.loop._ensure_node(n) == f"/dev/loop{n}"
            st = os.stat(f"/dev/loop{n}")
            assert st.st_rdev == os.makedev(*map(int, Path(f"/sys/block/loop{n}/dev").read_text().split(":")))
        finally:
            fcntl.ioctl(ctl, LOOP_CTL_REMOVE, n)
    finally:
        os.close(ctl)
