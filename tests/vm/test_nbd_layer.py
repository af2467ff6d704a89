"""The nbd layer and the kernel partition layer on a real kernel: every writable QEMU format served read-only,
a read-write round trip, kernel partitions against our parser, half-done attaches, busy detaches, two
processes racing for a device, internal snapshots, and a module loaded with other parameters."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.errors import BusyError, InvalidArgumentError, InvalidImageError, NoFreeDeviceError
from mountd.host.blockdev import BlockEvents, lock_out_udev
from mountd.host.nbddev import NbdModule, ensure_nbd_module, is_free, server_pid
from mountd.host.processes import proc_state
from mountd.layers.layer import LayerRecord, LayerState, layer_from_record
from mountd.layers.nbd import BLKRRPART, KernelPartitionLayer, NbdLayer
from tests.support.leftovers import device_descriptors
from tests.support.nbd_layers import (
    attach,
    nbd_attached,
    nbd_identity,
    partitions_attached,
    read_at,
    sys_attr,
    table_of,
)

MiB = images.MiB
OFFSET = 3 * MiB + 512  # a known place, not aligned to anything a format would align to
PAYLOAD = os.urandom(64 * 1024)
WRITABLE_FORMATS = ["raw", "qcow2", "qcow", "vmdk", "vdi", "vhdx", "vpc", "qed", "parallels"]
FORMAT_OPTIONS = {"vpc": ("force_size=on",)}  # else vpc rounds the size to a CHS geometry
GPT = """label: gpt
start=2048, size=6144, name=one
start=10240, size=8M, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=ext4
start=30000, size=3M, name=odd
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8 MiB raw image holding PAYLOAD at OFFSET."""
    raw = images.blank(tmp_path_factory.mktemp("nbd") / "source.raw", 8 * MiB)
    with open(raw, "r+b") as f:
        f.seek(OFFSET)
        f.write(PAYLOAD)
    return raw


@pytest.fixture(scope="module")
def gpt_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 GPT disk: three partitions, the second an ext4 holding hello.txt."""
    directory = tmp_path_factory.mktemp("gpt")
    raw = images.blank(directory / "gpt.raw", 32 * MiB)
    images.partition(raw, GPT)
    (directory / "files").mkdir()
    (directory / "files" / "hello.txt").write_bytes(b"hello\n")
    # mke2fs writes at an offset into the file itself: no loop device (the lane's kernel has none loaded).
    images.run(["mkfs.ext4", "-q", "-F", "-L", "data", "-E", f"offset={10240 * 512}", "-d",
                str(directory / "files"), str(raw), "8M"])
    return images.convert(raw, raw.with_suffix(".qcow2"), "qcow2")


def _server_gone(pid: int) -> bool:
    """The server exited: no such process, or a zombie that the guest's init has not reaped yet."""
    found = proc_state(pid)
    return found is None or found.state in ("Z", "X")


def read_direct(path: str, offset: int = 0, length: int = 4096) -> bytes:
    """Read with O_DIRECT: from the device (or file) itself, not from the page cache."""
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        got = os.preadv(fd, [buf], offset)
        return bytes(buf[:got])
    finally:
        os.close(fd)
        buf.close()


@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_every_writable_format_serves_the_raw_bytes_read_only(fmt: str, source: Path) -> None:
    image = source if fmt == "raw" else images.convert(source, source.with_suffix(f".{fmt}"), fmt,
                                                        *FORMAT_OPTIONS.get(fmt, ()))
    layer, progress = attach("nbd", **nbd_identity(image))
    try:
        name = Path(layer.node).name
        # The journal named the device and the pid file before qemu-nbd ran, then the server's pid.
        assert progress[0].identity["node"] == layer.node and "pid" not in progress[0].identity
        assert progress[-1].identity["pid"] == layer.identity["pid"]
        assert layer.record.state == "attached" and layer.verify()
        assert server_pid(name) == layer.identity["pid"]
        assert layer.identity["size"] == 8 * MiB
        assert sys_attr(name, "ro") == "1"
        assert read_at(layer.node, OFFSET, len(PAYLOAD)) == PAYLOAD
        pid = layer.identity["pid"]
    finally:
        layer.detach()
    assert is_free(name) and _server_gone(pid) and not layer.verify()
    assert not Path(layer.identity["pid_file"]).exists()
    layer.detach()  # idempotent


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_read_write_round_trip(fmt: str, scratch: Path) -> None:
    image = scratch / f"rw.{fmt}"
    images.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "64M"])
    data = os.urandom(16 * MiB)
    with nbd_attached(image, read_only=False) as layer:
        assert sys_attr(Path(layer.node).name, "ro") == "0"
        fd = os.open(layer.node, os.O_WRONLY | os.O_CLOEXEC)
        try:
            assert os.pwrite(fd, data, 8 * MiB) == len(data)
        finally:
            os.close(fd)  # no fsync: detach must flush what the page cache holds
    check = subprocess.run(["qemu-img", "check", "-f", fmt, str(image)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = images.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(scratch / "back.raw")])
    assert raw == ""
    with open(scratch / "back.raw", "rb") as f:
        f.seek(8 * MiB)
        assert f.read(len(data)) == data


def test_kernel_partitions_match_our_parser(gpt_image: Path) -> None:
    assert ensure_nbd_module().max_part >= 15  # the kernel rounds max_part=16 up to 31 (2^n - 1)
    with nbd_attached(gpt_image) as disk, partitions_attached(disk.node) as parts:
        table = table_of(disk.node)
        assert sorted(parts) == [1, 2, 3]
        for part in table.partitions:
            layer = parts[part.number]
            assert layer.node == f"{disk.node}p{part.number}" and layer.verify()
            assert int(sys_attr(Path(layer.node).name, "start")) * 512 == part.start
            assert read_at(layer.node, 0, 4096) == read_at(disk.node, part.start, 4096)
        wrong = next(p for p in table.partitions if p.number == 3)
        with pytest.raises(InvalidImageError) as err:
            attach("partition", "p3", parent=disk.node, number=3, start=wrong.start + 4096, size=wrong.size)
        assert str(err.value) == (f"the kernel sees partition 3 of {disk.node} at byte {wrong.start} "
                                  f"({wrong.size} bytes), our parser at byte {wrong.start + 4096} "
                                  f"({wrong.size} bytes) (the kernel could not re-read the table: "
                                  "Device or resource busy)")  # the partitions above are held open
        with pytest.raises(InvalidImageError, match=r"partition 7 .* at nowhere"):
            attach("partition", "p7", parent=disk.node, number=7, start=MiB, size=MiB)


def udevd_rescan(disk: str) -> None:
    """What udevd does when a writer of a disk it watches (60-block.rules: nbd*) closes it, synthesize_change
    in systemd 252: the disk's exclusive lock, then BLKRRPART. udevd tries the lock once; here it is waited
    for (udev's workers hold it while they process the attach's events), so that only the kernel can refuse:
    OSError EBUSY while a partition is open."""
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        assert lock_out_udev(fd), f"udev kept {disk} locked"
        fcntl.ioctl(fd, BLKRRPART)
    finally:
        os.close(fd)


def test_no_table_is_reread_under_partitions_a_mount_is_built_on(gpt_image: Path) -> None:
    """Under load udevd does that late: in CI, on qemu-nbd's close of the mount before, as the next mount of
    the same device mapped a thin pool on a partition; the partition's node vanished under it. A partition
    layer holds its partition open until the mount is built (MountStack.building unpins it): the layers
    above hold it then, and the kernel refuses to re-read meanwhile."""
    with nbd_attached(gpt_image) as disk, partitions_attached(disk.node) as parts:
        with pytest.raises(OSError) as refused:
            udevd_rescan(disk.node)
        assert refused.value.errno == errno.EBUSY
        assert all(layer.verify() for layer in parts.values())
        for layer in parts.values():
            layer.unpin()
        assert not device_descriptors()
        udevd_rescan(disk.node)  # the control: with nothing holding a partition, the kernel re-reads
        assert all(layer.verify() for layer in parts.values())


def test_a_record_naming_a_device_we_never_served_detaches_without_touching_it(source: Path) -> None:
    with nbd_attached(source) as other:  # someone else's device, as far as the record below knows
        for node in (other.node, "/dev/nbd15"):
            half = NbdLayer(LayerRecord("nbd", "", LayerState.ATTACHING, {
                **nbd_identity(source), "node": node, "pid_file": "/run/imgmount/nbd/never-written.pid"}))
            assert not half.verify()
            half.detach()
        assert other.verify()
        assert read_at(other.node, OFFSET, len(PAYLOAD)) == PAYLOAD


def test_a_server_that_died_detaches_cleanly(source: Path) -> None:
    layer, _ = attach("nbd", **nbd_identity(source))
    pid, name = layer.identity["pid"], Path(layer.node).name
    events = BlockEvents()
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)  # injected fault: the server dies (a crash, the OOM killer)
        assert select.select([pidfd], [], [], 30)[0], "the killed qemu-nbd did not exit"
        assert not layer.verify()
        assert events.wait(lambda: is_free(name), 30), f"the kernel did not free {layer.node}"
    finally:
        os.close(pidfd)
        layer.detach()
    assert is_free(name) and not Path(layer.identity["pid_file"]).exists()


def test_a_crash_before_the_pid_was_recorded_is_found_by_the_pid_file(source: Path) -> None:
    layer, progress = attach("nbd", **nbd_identity(source))
    name, pid = Path(layer.node).name, layer.identity["pid"]
    try:
        crashed = NbdLayer(progress[0])  # the record as it was just before qemu-nbd ran: node and pid file only
        assert "pid" not in crashed.identity
        crashed.detach()
    finally:
        layer.detach()
    assert is_free(name) and _server_gone(pid)


def test_detach_while_a_partition_is_mounted_is_busy_and_harmless(gpt_image: Path) -> None:
    with (nbd_attached(gpt_image) as disk, partitions_attached(disk.node) as parts,
          images.mounted(parts[2].node, read_only=True) as mnt):
        with pytest.raises(BusyError, match=f"{parts[2].node} mounted on {mnt}"):
            disk.detach()
        with pytest.raises(BusyError, match=f"mounted on {mnt}"):
            parts[2].detach()
        # Still served: reads that bypass the page cache reach qemu-nbd and come back right.
        assert disk.verify() and parts[2].verify()
        assert read_direct(str(mnt / "hello.txt")) == b"hello\n"
        assert read_direct(disk.node, 10240 * 512 + 1024)[56:58] == b"\x53\xef"  # ext4 magic


RACER = """
import json, sys
from mountd.layers.layer import LayerRecord
from mountd.layers.nbd import NbdLayer
identity = json.loads(sys.argv[1])
layer = NbdLayer(LayerRecord("nbd", "", "attaching", identity))
print("ready", flush=True)
sys.stdin.readline()  # the start signal: every racer begins at once
def progress(record):
    print(json.dumps(record.identity), flush=True)
print(json.dumps(layer.attach(progress).identity), flush=True)
"""


def test_two_processes_attaching_at_once_get_different_devices(source: Path) -> None:
    identity = nbd_identity(source)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, json.dumps(identity)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[2])
              for _ in range(2)]
    last: list[dict[str, object]] = []
    first_tries = set()
    try:
        for racer in racers:  # a barrier: all have imported everything and built their layer
            assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        for racer in racers:
            out, err = racer.communicate(timeout=120)
            lines = [json.loads(line) for line in out.splitlines()]
            if lines:
                last.append(lines[-1])
                first_tries.add(lines[0]["node"])
            assert racer.returncode == 0, err
        layers = [layer_from_record(LayerRecord("nbd", "", LayerState.ATTACHED, x)) for x in last]
        assert len(first_tries) == 1, "the racers did not go for the same device: no race was run"
        assert len({x.node for x in layers}) == 2, [x.node for x in layers]
        assert all(x.verify() for x in layers)
        assert all(read_at(x.node, OFFSET, len(PAYLOAD)) == PAYLOAD for x in layers)
    finally:
        for identity_seen in last:
            layer_from_record(LayerRecord("nbd", "", LayerState.ATTACHING, identity_seen)).detach()


def test_internal_snapshot_is_served_read_only(scratch: Path, source: Path) -> None:
    image = images.convert(source, scratch / "snap.qcow2", "qcow2")
    images.run(["qemu-img", "snapshot", "-c", "before", str(image)])
    images.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {OFFSET} 64k", str(image)])
    with nbd_attached(image, snapshot="before") as layer:
        assert sys_attr(Path(layer.node).name, "ro") == "1"
        assert read_at(layer.node, OFFSET, len(PAYLOAD)) == PAYLOAD
    with nbd_attached(image) as layer:
        assert read_at(layer.node, OFFSET, len(PAYLOAD)) == b"\x5a" * len(PAYLOAD)
    with pytest.raises(InvalidArgumentError, match="read-only"):
        attach("nbd", **nbd_identity(image, read_only=False, snapshot="before"))


@pytest.fixture
def reloadable_nbd() -> Iterator[None]:
    """Lets a test reload the nbd module; puts it back with the parameters it had."""
    params = Path("/sys/module/nbd/parameters")
    before = {p: (params / p).read_text().strip() for p in ("max_part", "nbds_max")}
    try:
        yield
    finally:
        _reload(**before)
        assert ensure_nbd_module().max_part == int(before["max_part"])


def _reload(**params: str) -> None:
    images.run(["udevadm", "settle"])  # udev workers probing the devices would keep the module busy
    if Path("/sys/module/nbd").exists():
        images.run(["rmmod", "nbd"])
    if params:
        images.run(["modprobe", "nbd", *(f"{k}={v}" for k, v in params.items())])


def test_ensure_nbd_module_loads_it_or_keeps_what_is_loaded(reloadable_nbd: None, source: Path) -> None:
    _reload()
    assert ensure_nbd_module(min_devices=20) == ensure_nbd_module() == NbdModule(max_part=31, nbds_max=20)
    _reload(max_part="0", nbds_max="2")
    assert ensure_nbd_module().max_part == 0 and ensure_nbd_module().nbds_max == 2
    with nbd_attached(source) as one, nbd_attached(source) as two:
        assert {one.node, two.node} == {"/dev/nbd0", "/dev/nbd1"}
        with pytest.raises(NoFreeDeviceError, match="all 2 nbd devices are in use"):
            attach("nbd", **nbd_identity(source))


def test_kernel_partition_layer_is_rebuilt_from_its_record(gpt_image: Path) -> None:
    with nbd_attached(gpt_image) as disk, partitions_attached(disk.node) as parts:
        again = layer_from_record(parts[1].record)
        assert isinstance(again, KernelPartitionLayer) and again.verify()
