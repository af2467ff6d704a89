"""The mount engine on this host (no nbd, no device-mapper): loop and fuse backends, for real."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.errors import BusyError, InUseError, InvalidArgumentError, NotFoundError, UnsupportedError
from mountd.layers.layer import InjectedFault
from mountd.model import MountInfo, MountRequest
from mountd.settings import Settings
from tests.support import guests, leftovers
from tests.support.guests import Guest
from tests.support.vms import running_vm

MiB = images.MiB
FUSE_FORMATS = [("qcow2", ()), ("vmdk", ()), ("vdi", ()), ("vhdx", ()), ("vpc", ("force_size=on",))]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine(Journal(str(tmp_path / "state")))
    yield eng
    for m in eng.mounts():  # a failing test must not leave its mounts to the leftover check
        eng.unmount(m.id, force=True)


@pytest.fixture(scope="module")
def mbr(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    return guests.mbr_guest(tmp_path_factory.mktemp("mbr") / "mbr.raw")


def _mount(engine: Engine, image: Path, root: Path, **kw: object) -> MountInfo:
    return engine.mount(MountRequest(image=str(image), mount_root=str(root), **kw))  # type: ignore[arg-type]


def _check_all(info: MountInfo, guest: Guest) -> None:
    assert {v.name: v.filesystem for v in info.volumes} == dict(guest.fstypes)
    for v in info.volumes:
        guests.check_files(Path(v.mountpoint), guest.files[v.name])


def _assert_gone(info: MountInfo, engine: Engine) -> None:
    mounted = Path("/proc/self/mountinfo").read_text()
    for v in info.volumes:
        assert f" {v.mountpoint} " not in mounted
        assert not os.path.exists(v.mountpoint), "the mountpoint directory was not removed"
    assert engine.mounts() == []


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def test_raw_gpt_through_loop_every_filesystem_and_a_linear_lv(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    info = _mount(engine, gpt.raw, tmp_path / "media")
    assert (info.backend, info.format, info.read_only, info.state) == ("loop", "raw", True, "mounted")
    _check_all(info, gpt)
    with pytest.raises(OSError, match="Read-only file system"):
        (Path(info.volumes[0].mountpoint) / "new").write_bytes(b"x")
    engine.unmount(info.id)
    _assert_gone(info, engine)


def test_mbr_logical_partitions(engine: Engine, mbr: Guest, tmp_path: Path) -> None:
    info = _mount(engine, mbr.raw, tmp_path / "media")
    _check_all(info, mbr)
    engine.unmount(info.id)
    _assert_gone(info, engine)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_whole_disk_filesystem(engine: Engine, tmp_path: Path, fstype: str) -> None:
    guest = guests.whole_disk_guest(tmp_path / "whole.raw", fstype) if fstype != "btrfs" else None
    if guest is None:  # btrfs needs more room than the other two
        raw = images.blank(tmp_path / "whole.raw", 128 * MiB)
        images.format_region(raw, 0, 128 * MiB, "btrfs", files=guests._content("disk"))
        guest = Guest(raw, {"disk": guests._content("disk")}, {"disk": "btrfs"})
    info = _mount(engine, guest.raw, tmp_path / "media")
    _check_all(info, guest)
    assert Path(info.volumes[0].mountpoint).name == "whole"
    engine.unmount(info.id)


@pytest.mark.parametrize(("fmt", "options"), FUSE_FORMATS, ids=[f for f, _ in FUSE_FORMATS])
def test_formats_through_fuse(engine: Engine, gpt: Guest, tmp_path: Path, fmt: str,
                              options: tuple[str, ...]) -> None:
    image = images.convert(gpt.raw, tmp_path / f"gpt.{fmt}", fmt, *options)
    info = _mount(engine, image, tmp_path / "media")
    assert (info.backend, info.format) == ("fuse", fmt)
    _check_all(info, gpt)
    engine.unmount(info.id)
    _assert_gone(info, engine)


@pytest.mark.parametrize("subformat", ["streamOptimized", "monolithicSparse"])
def test_a_renamed_sparse_vmdk_mounts(engine: Engine, gpt: Guest, tmp_path: Path, subformat: str) -> None:
    """Every OVA export renames its disks: the descriptor embedded in a sparse VMDK still names the file it
    was written as, and QEMU, which takes a sparse file as its own one extent, opens it anyway (issue 10)."""
    written = images.convert(gpt.raw, tmp_path / "disk1.vmdk", "vmdk", f"subformat={subformat}")
    renamed = written.rename(tmp_path / "appliance-disk1.vmdk")
    assert b'"disk1.vmdk"' in renamed.read_bytes()[:65536]  # what the embedded descriptor still names
    info = _mount(engine, renamed, tmp_path / "media")
    assert (info.backend, info.format) == ("fuse", "vmdk")
    _check_all(info, gpt)
    engine.unmount(info.id)
    _assert_gone(info, engine)


def test_volume_selection_and_unknown_volume(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    info = _mount(engine, gpt.raw, tmp_path / "media", volumes=("guestvg/root",))
    assert [v.name for v in info.volumes] == ["guestvg/root"]
    engine.unmount(info.id)
    with pytest.raises(NotFoundError, match=r"no volume named p9 .*p1, p2"):
        _mount(engine, gpt.raw, tmp_path / "media", volumes=("p9",))
    assert engine.mounts() == []


def test_same_image_twice_returns_the_same_mount(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    first = _mount(engine, gpt.raw, tmp_path / "media")
    assert _mount(engine, gpt.raw, tmp_path / "media") == first
    with pytest.raises(InUseError, match="already mounted read-only"):
        _mount(engine, gpt.raw, tmp_path / "media", read_only=False)
    engine.unmount(first.id)


@pytest.mark.parametrize("backend", ["loop", "fuse"])
def test_read_write_round_trip(engine: Engine, gpt: Guest, tmp_path: Path, backend: str) -> None:
    image = _copy(gpt.raw, tmp_path / "rw.raw") if backend == "loop" else \
        images.convert(gpt.raw, tmp_path / "rw.qcow2", "qcow2")
    data = os.urandom(64 * MiB)
    info = _mount(engine, image, tmp_path / "media", read_only=False, volumes=("p1", "guestvg/root"), backend=backend)
    assert info.backend == backend and not info.read_only
    for v in info.volumes:
        (Path(v.mountpoint) / "big.bin").write_bytes(data)
    engine.unmount(info.id)
    if backend == "fuse":
        subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], check=True, capture_output=True)
    again = _mount(engine, image, tmp_path / "media", volumes=("p1", "guestvg/root"))
    for v in again.volumes:
        assert hashlib.sha256((Path(v.mountpoint) / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        guests.check_files(Path(v.mountpoint), gpt.files[v.name])
    engine.unmount(again.id)


def test_loop_backend_refuses_qcow2(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    image = images.convert(gpt.raw, tmp_path / "x.qcow2", "qcow2")
    with pytest.raises(UnsupportedError, match="loop backend maps raw images only"):
        _mount(engine, image, tmp_path / "media", backend="loop")


def test_bad_requests(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown backend"):
        _mount(engine, gpt.raw, tmp_path, backend="magic")
    with pytest.raises(InvalidArgumentError, match="read-only"):
        _mount(engine, gpt.raw, tmp_path, snapshot="s1", read_only=False)
    with pytest.raises(InvalidArgumentError, match="mount option"):
        _mount(engine, gpt.raw, tmp_path / "media", mount_options=("exec,suid",))
    assert engine.mounts() == []


# --- in use -----------------------------------------------------------------------------------------------


def test_image_in_use_by_a_read_write_vm_is_refused_with_its_pid(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    image = _copy(gpt.raw, tmp_path / "vm.raw")
    with running_vm(f"file={image},format=raw") as vm:
        for ro in (True, False):
            with pytest.raises(InUseError, match=rf"in use read-write by qemu-system-x86_64, pid {vm.pid}"):
                _mount(engine, image, tmp_path / "media", read_only=ro)
    assert engine.mounts() == []


def test_image_in_use_read_only_allows_read_only_only(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    image = images.convert(gpt.raw, tmp_path / "ro.qcow2", "qcow2")
    with running_vm(f"file={image},format=qcow2,readonly=on") as vm:
        with pytest.raises(InUseError, match=rf"read-only by qemu-system-x86_64, pid {vm.pid}"):
            _mount(engine, image, tmp_path / "media", read_only=False)
        info = _mount(engine, image, tmp_path / "media")
        _check_all(info, gpt)
        engine.unmount(info.id)


def test_backing_file_of_a_running_overlay(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    base = images.convert(gpt.raw, tmp_path / "base.qcow2", "qcow2")
    overlay = tmp_path / "overlay.qcow2"
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)])
    with running_vm(f"file={overlay},format=qcow2") as vm:
        with pytest.raises(InUseError, match=rf"pid {vm.pid}"):
            _mount(engine, base, tmp_path / "media", read_only=False)
        with pytest.raises(InUseError, match=rf"pid {vm.pid}"):
            _mount(engine, overlay, tmp_path / "media")


@pytest.mark.parametrize(("backend", "fmt"), [("loop", "raw"), ("fuse", "qcow2")])
def test_a_vm_cannot_start_on_an_image_we_hold(engine: Engine, gpt: Guest, tmp_path: Path, backend: str,
                                              fmt: str) -> None:
    image = _copy(gpt.raw, tmp_path / "held.raw") if fmt == "raw" else \
        images.convert(gpt.raw, tmp_path / "held.qcow2", fmt)
    info = _mount(engine, image, tmp_path / "media", backend=backend)
    with pytest.raises(RuntimeError, match="lock"), running_vm(f"file={image},format={fmt}"):
        pass
    engine.unmount(info.id)
    with running_vm(f"file={image},format={fmt}"):
        pass  # and once we let go, it can


# --- busy and rollback ----------------------------------------------------------------------------------


def test_busy_unmount_names_the_process_and_changes_nothing(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    info = _mount(engine, gpt.raw, tmp_path / "media", volumes=("p1",))
    mountpoint = info.volumes[0].mountpoint
    proc = subprocess.Popen(["sleep", "600"], cwd=mountpoint)
    try:
        with pytest.raises(BusyError, match=rf"sleep.*{proc.pid}|{proc.pid}.*sleep"):
            engine.unmount(info.id)
        assert engine.mounts()[0].state == "mounted"
        guests.check_files(Path(mountpoint), gpt.files["p1"])
        assert engine.verify(info.id) == []
    finally:
        proc.kill()
        proc.wait()
    engine.unmount(info.id)
    _assert_gone(info, engine)


def test_force_unmount_is_lazy(engine: Engine, gpt: Guest, tmp_path: Path) -> None:
    info = _mount(engine, gpt.raw, tmp_path / "media", volumes=("p1",))
    proc = subprocess.Popen(["sleep", "600"], cwd=info.volumes[0].mountpoint)
    try:
        engine.unmount(info.id, force=True)
        assert engine.mounts() == []
        assert f" {info.volumes[0].mountpoint} " not in Path("/proc/self/mountinfo").read_text()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("backend", "fmt"), [("loop", "raw"), ("fuse", "qcow2")])
def test_a_fault_at_every_attach_step_leaves_nothing_behind(engine: Engine, gpt: Guest, tmp_path: Path, backend: str,
                                                           fmt: str) -> None:
    """Injected faults (a failure we cannot cause for real at each exact step): IMGMOUNT_FAULT_AT=N fails
    the N-th step of the attach, before or after each layer; every step is tried until the mount succeeds."""
    image = gpt.raw if fmt == "raw" else images.convert(gpt.raw, tmp_path / "f.qcow2", fmt)
    media = tmp_path / "media"
    before = leftovers.snapshot()
    for step in range(1, 100):
        faulty = Engine(engine.journal, settings=Settings(fault_at=step))
        try:
            info = _mount(faulty, image, media, backend=backend)
        except InjectedFault as exc:
            assert f"step {step}" in str(exc)
            assert leftovers.snapshot().new_since(before) == [], f"leftovers after a fault at step {step}"
            assert engine.mounts() == [] and list(engine.journal.mounts.glob("*")) == []
            assert not media.exists() or list(media.iterdir()) == []
            continue
        assert step > 8, "the attach has fewer fault points than layers"
        engine.unmount(info.id)
        break
    else:
        pytest.fail("the mount never succeeded")


def test_commands_share_mounts_across_processes(gpt: Guest, tmp_path: Path) -> None:
    env = {**os.environ, "IMGMOUNT_STATE_DIR": str(tmp_path / "state")}
    bin_dir = Path(sys.executable).parent

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, env=env,
                              check=False)

    mounted = run("imgmount", str(gpt.raw), "--mount-root", str(tmp_path / "media"), "--json")
    assert mounted.returncode == 0, mounted.stderr
    info = json.loads(mounted.stdout)
    assert {v["name"] for v in info["volumes"]} == set(gpt.fstypes)
    listed = run("imgmount", "--list")
    assert listed.returncode == 0 and str(gpt.raw) in listed.stdout and info["id"] in listed.stdout
    p1 = next(v["mountpoint"] for v in info["volumes"] if v["name"] == "p1")
    unmounted = run("imgumount", p1)
    assert unmounted.returncode == 0, unmounted.stderr
    assert json.loads(run("imgmount", "--list", "--json").stdout) == []
    gone = run("imgumount", str(gpt.raw))
    assert gone.returncode == NotFoundError.exit_code
    assert gone.stderr.startswith("imgumount: ") and "not mounted" in gone.stderr and gone.stderr.count("\n") == 1
