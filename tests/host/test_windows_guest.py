"""A Windows disk (GPT: ESP, MSR, C:, recovery, exFAT data) on this host, whose kernel has no ntfs3, vfat or
exfat: every volume through its FUSE driver (ntfs-3g, fusefat, exfat-fuse), for real."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from imgmount_testkit import images, windows
from imgmount_testkit.users import as_user
from imgmount_testkit.windows import WindowsGuest
from mountd.engine.engine import Engine
from mountd.engine.inspection import inspect_image
from mountd.engine.journal import Journal
from mountd.errors import InvalidArgumentError, InvalidImageError, UnsupportedError
from mountd.host.filesystems import mountable_types
from mountd.host.processes import is_alive
from mountd.layers.layer import InjectedFault, LayerState
from mountd.model import MountInfo, MountRequest, MountState
from mountd.settings import Settings
from tests.support import leftovers
from tests.support.daemon_calls import wait_gone
from tests.support.engines import engine_in

DRIVERS = {"p1": "fusefat", "p3": "ntfs-3g", "p4": "ntfs-3g", "p5": "mount.exfat-fuse"}
SHOWN_AS = {"fusefat": "fuse.fusefat", "ntfs-3g": "fuseblk", "mount.exfat-fuse": "fuseblk"}

pytestmark = pytest.mark.skipif(bool({"ntfs3", "vfat", "exfat"} & mountable_types()),
                                reason="this kernel mounts some of these itself: the FUSE drivers are not used")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with engine_in(tmp_path / "state") as eng:
        yield eng


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> WindowsGuest:
    return windows.windows_guest(tmp_path_factory.mktemp("win") / "win.raw")


@pytest.fixture(scope="module")
def vhdx(guest: WindowsGuest) -> Path:
    return windows.vhdx(guest, guest.raw.with_suffix(".vhdx"))


def mount(engine: Engine, image: Path, root: Path, **kw: object) -> MountInfo:
    return engine.mount(MountRequest(image=str(image), mount_root=str(root), **kw))  # type: ignore[arg-type]


def find(root: Path, name: str, *, fold: bool) -> Path:
    """``root/name``; with ``fold``, each component matched without case (fusefat shows the 8.3 names that
    Windows and mtools store lowercase, through the NT case flags, in upper case)."""
    path = root
    for part in name.split("/"):
        path = next((c for c in path.iterdir() if c.name.lower() == part.lower()), path / part) if fold \
            else path / part
    return path


def check_files(info: MountInfo, files: Mapping[str, Mapping[str, bytes]]) -> None:
    for v in info.volumes:
        for name, data in files[v.name].items():
            assert find(Path(v.mountpoint), name, fold=v.name == "p1").read_bytes() == data, name


def drivers_of(engine: Engine, info: MountInfo) -> dict[str, tuple[str, int, int]]:
    """volume -> (driver, pid, start time), as the journal recorded them."""
    return {r.volume: (r.identity["driver"], r.identity["pid"], r.identity["start_time"])
            for r in engine.journal.read(info.id).layers if r.kind == "mount"}


def shown_types(info: MountInfo) -> dict[str, str]:
    by_path = {line.split()[4]: line.split(" - ")[1].split()[0]
               for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    return {v.name: by_path[v.mountpoint] for v in info.volumes}


def left_by(tmp_path: Path, before: leftovers.Snapshot) -> list[str]:
    """What is new since ``before`` and ours (other developers' tests run beside these): every image,
    export, mountpoint and driver command line of these tests is under ``tmp_path`` (the snapshot shows a
    command line cut short: drivers are looked for in full)."""
    new = [x for x in leftovers.snapshot().new_since(before) if str(tmp_path) in x]
    return new + [f"FUSE driver pid {pid}" for pid in drivers_under(tmp_path)]


def drivers_under(path: Path) -> list[int]:
    """Live FUSE driver processes whose command line names something under ``path``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]).decode(errors="replace") in DRIVERS.values() \
                and any(a.startswith(os.fsencode(f"{path}/")) for a in argv):
            found.append(int(pid))
    return found


def assert_gone(engine: Engine, info: MountInfo, drivers: Mapping[str, tuple[str, int, int]]) -> None:
    for _, pid, start in drivers.values():
        assert not is_alive(pid, start), f"driver pid {pid} still runs after the unmount"
    mounted = Path("/proc/self/mountinfo").read_text()
    assert all(f" {v.mountpoint} " not in mounted and not os.path.exists(v.mountpoint) for v in info.volumes)
    assert engine.mounts() == []


def test_every_volume_of_a_vhdx_reads_back_read_only(engine: Engine, guest: WindowsGuest, vhdx: Path,
                                                    tmp_path: Path) -> None:
    before = leftovers.snapshot()
    info = mount(engine, vhdx, tmp_path / "media")
    assert (info.format, info.backend, info.read_only) == ("vhdx", "fuse", True)
    assert {v.name: v.filesystem for v in info.volumes} == guest.fstypes  # the MSR holds nothing to mount
    assert info.notes == ()
    drivers = drivers_of(engine, info)
    assert {v: d[0] for v, d in drivers.items()} == DRIVERS
    assert shown_types(info) == {v: SHOWN_AS[d] for v, d in DRIVERS.items()}
    check_files(info, guest.files)
    for v in info.volumes:
        with pytest.raises(OSError, match="Read-only file system"):
            (Path(v.mountpoint) / "new.txt").write_bytes(b"x")
    engine.unmount(info.id)
    assert_gone(engine, info, drivers)
    assert left_by(tmp_path, before) == []


def test_read_write_ntfs_and_exfat_persist_to_a_fresh_mount(engine: Engine, guest: WindowsGuest,
                                                             tmp_path: Path) -> None:
    image = tmp_path / "rw.raw"
    subprocess.run(["cp", "--sparse=always", str(guest.raw), str(image)], check=True)
    written = {"p3": {"Users/Public/Documents/nouveau fichier é.txt": os.urandom(300_000)},
               "p5": {"Data/новый.bin": os.urandom(70_000)}}
    info = mount(engine, image, tmp_path / "media", read_only=False, volumes=("p3", "p5"))
    for v in info.volumes:
        for name, data in written[v.name].items():
            (Path(v.mountpoint) / name).write_bytes(data)
    drivers = drivers_of(engine, info)
    engine.unmount(info.id)
    assert_gone(engine, info, drivers)
    again = mount(engine, image, tmp_path / "media", volumes=("p3", "p5"))
    check_files(again, written)
    check_files(again, {v: guest.files[v] for v in ("p3", "p5")})
    engine.unmount(again.id)


def test_fat_is_read_only_through_fusefat(engine: Engine, guest: WindowsGuest, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match=r"vfat volumes mount read-only on this host.*fusefat"):
        mount(engine, guest.raw, tmp_path / "media", read_only=False, volumes=("p1",))
    assert engine.mounts() == []


@pytest.mark.parametrize(("variant", "why"), [
    ("hibernated", "Windows on it is hibernated or was shut down with Fast Startup"),
    ("dirty", "its dirty flag is set")])
def test_a_hibernated_or_dirty_windows_mounts_read_only_with_a_note(engine: Engine, tmp_path: Path,
                                                                    variant: str, why: str) -> None:
    unsafe = windows.windows_guest(tmp_path / f"{variant}.raw", variant=variant)
    said = {v.name: v.note for v in inspect_image(str(unsafe.raw)).volumes}  # what --info shows
    assert said["p3"] == f"{'hibernated Windows (or Fast Startup)' if variant == 'hibernated' else 'dirty'}: " \
        "mounts read-only only" and said["p4"] == ""
    before = leftovers.snapshot()
    refused = rf"volume p3 cannot be mounted read-write \(mount it read-only\): {why}"
    with pytest.raises(InvalidArgumentError, match=refused):
        mount(engine, unsafe.raw, tmp_path / "media", read_only=False, volumes=("p3",))
    assert engine.mounts() == [] and left_by(tmp_path, before) == []
    info = mount(engine, unsafe.raw, tmp_path / "media")
    notes = dict(info.notes)
    assert set(notes) == {"p3"} and notes["p3"].startswith(f"read-write is refused: {why}")
    check_files(info, unsafe.files)
    engine.unmount(info.id)


def test_the_owner_sees_the_files_as_theirs_and_no_one_else_reads_them(engine: Engine, guest: WindowsGuest,
                                                                       tmp_path: Path) -> None:
    owner, stranger = 47011, 47012
    info = engine.mount(MountRequest(image=str(guest.raw), owner=owner, volumes=("p3", "p5")))
    try:
        for v in info.volumes:
            name = next(iter(guest.files[v.name]))
            path = Path(v.mountpoint) / name
            assert (path.stat().st_uid, path.parent.stat().st_uid) == (owner, owner)
            mine = subprocess.run([*as_user(owner, owner), "cat", str(path)], capture_output=True, check=False)
            assert mine.stdout == guest.files[v.name][name]
            theirs = subprocess.run([*as_user(stranger, stranger), "cat", str(path)], capture_output=True,
                                    text=True, check=False)
            assert theirs.returncode != 0 and "Permission denied" in theirs.stderr
    finally:
        engine.unmount(info.id)


def test_a_restart_adopts_a_running_driver_and_cleans_up_a_dead_one(engine: Engine, guest: WindowsGuest,
                                                                     tmp_path: Path) -> None:
    info = mount(engine, guest.raw, tmp_path / "media", volumes=("p3",))
    restarted = Engine(Journal(engine.journal.root))  # what the daemon does at start: verify each record
    assert restarted.clean_up(info.id) is not None
    drivers = drivers_of(engine, info)
    _, pid, _ = drivers["p3"]
    os.kill(pid, signal.SIGKILL)  # the driver dies: its mount stays, dead ("Transport endpoint ...")
    wait_gone(pid)
    assert restarted.verify(info.id) != []
    assert restarted.clean_up(info.id) is None
    assert_gone(restarted, info, drivers)


def test_a_fault_at_each_step_leaves_no_driver_behind(engine: Engine, guest: WindowsGuest,
                                                      tmp_path: Path) -> None:
    """Injected faults (a failure we cannot cause at each exact step), the last ones around the FUSE mounts."""
    before = leftovers.snapshot()
    for step in range(1, 9):
        faulty = Engine(engine.journal, settings=Settings(fault_at=step))
        with pytest.raises(InjectedFault):
            mount(faulty, guest.raw, tmp_path / "media", volumes=("p3", "p5"))
        assert left_by(tmp_path, before) == [], f"leftovers after a fault at step {step}"
    assert engine.mounts() == []


def test_a_damaged_ntfs_is_refused_in_ntfs3gs_words_and_nothing_stays(engine: Engine, guest: WindowsGuest,
                                                                       tmp_path: Path) -> None:
    image = tmp_path / "damaged.raw"
    subprocess.run(["cp", "--sparse=always", str(guest.raw), str(image)], check=True)
    c_drive = next(p for p in images.sfdisk_json(image)["partitions"] if p["node"].endswith("3"))["start"] * 512
    with open(image, "r+b") as f:
        boot = os.pread(f.fileno(), 512, c_drive)
        mirror = c_drive + struct.unpack_from("<Q", boot, 0x38)[0] * 4096
        os.pwrite(f.fileno(), bytes(4096), mirror)  # $MFTMirr no longer matches $MFT: blkid still sees NTFS
    before = leftovers.snapshot()
    with pytest.raises(InvalidImageError, match=r"^ntfs-3g cannot mount the ntfs filesystem on /dev/loop\d+ "
                                                r"\(volume p3\): Record 0 has no FILE magic"):
        mount(engine, image, tmp_path / "media", volumes=("p3",))
    assert left_by(tmp_path, before) == [] and engine.mounts() == []


def test_a_driver_a_crash_left_unrecorded_is_found_by_its_command_line(engine: Engine, guest: WindowsGuest,
                                                                       tmp_path: Path) -> None:
    """The journal as a crash between the driver's mount and its record leaves it (edited: no fault point
    sits inside that step): still "attaching", no pid, no mount id. The clean-up at start finds the mount
    by path and type, the driver by its command line, unmounts and waits for the driver to exit."""
    info = mount(engine, guest.raw, tmp_path / "media", volumes=("p3",))
    record = engine.journal.read(info.id)
    *below, top = record.layers
    unrecorded = {k: v for k, v in top.identity.items() if k not in ("pid", "start_time", "mount_id", "dev")}
    engine.journal.write(replace(record, state=MountState.MOUNTING, layers=(
        *below, replace(top, state=LayerState.ATTACHING, identity=unrecorded))))
    (pid,) = drivers_under(tmp_path)
    assert Engine(Journal(engine.journal.root)).clean_up(info.id) is None
    assert not is_alive(pid, top.identity["start_time"]) and drivers_under(tmp_path) == []
    assert engine.mounts() == [] and not os.path.exists(info.volumes[0].mountpoint)
