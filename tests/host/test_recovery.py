"""Recovery that writes nothing: a filesystem left by a crash with its last acknowledged writes only in its
journal or log is flagged by ``--info``, and a read-only mount shows those writes, replayed into a throwaway
overlay, while the image's bytes stay exactly as they were.

Every crashed image here is made the way the report made it: the filesystem mounted read-write over a
``qemu-storage-daemon`` export, files written and fsynced one by one, then the daemon killed with SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.bus import world_dir
from mountd.cli import main as cli
from mountd.engine.engine import Engine
from mountd.host.holders import READ_ONLY, file_usage
from mountd.host.opener import Credentials
from mountd.host.support import check_host
from mountd.image import recovery
from mountd.image.blockio import FileReader
from mountd.image.fsprobe import probe
from mountd.layers.layer import InjectedFault
from mountd.model import MountRequest
from mountd.settings import STATE_DIR_ENV, Settings
from tests.support import leftovers
from tests.support.vms import running_vm

MiB = images.MiB
SIZE = 160 * MiB
PART_START = MiB
PART_SIZE = SIZE - 2 * MiB  # room for the backup GPT at the end
FILES = 48
CASES = [("raw", "ext4"), ("qcow2", "ext4"), ("raw", "xfs"), ("qcow2", "xfs"), ("raw", "btrfs")]
OVERLAY_DIR = Path("/var/tmp")
CALLER = "daemon"  # an existing unprivileged account


@dataclass(frozen=True)
class Crashed:
    """An image whose filesystem was being written when its QEMU was killed."""

    image: Path
    fmt: str
    fstype: str
    volume: str  # "disk" (raw: a filesystem on the whole disk) or "p1" (qcow2: a GPT partition)
    offset: int
    size: int
    files: dict[str, bytes]

    @property
    def backend(self) -> str:
        return "loop" if self.fmt == "raw" else "fuse"


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{t}" for f, t in CASES])
def crashed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Crashed:
    fmt, fstype = request.param
    base = tmp_path_factory.mktemp(f"crashed-{fmt}-{fstype}")
    raw = images.blank(base / "disk.raw", SIZE)
    offset, size, volume = (0, SIZE, "disk") if fmt == "raw" else (PART_START, PART_SIZE, "p1")
    if volume == "p1":
        images.partition(raw, f"label: gpt\nstart={PART_START // 512}, size={PART_SIZE // 512}\n")
    images.format_region(raw, offset, size, fstype)
    image = raw if fmt == "raw" else images.convert(raw, base / "disk.qcow2", "qcow2")
    if image != raw:
        raw.unlink()
    files = {f"acknowledged-{i:03d}.bin": os.urandom(256 << 10) for i in range(FILES)}
    images.crash_after_writing(image, fmt, files, offset=offset, size=size)
    return Crashed(image, fmt, fstype, volume, offset, size, files)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private state directory: the commands then run the engine in-process."""
    path = tmp_path / "state"
    monkeypatch.setenv(STATE_DIR_ENV, str(path))
    yield path
    engine = Engine(settings=Settings(state_dir=path))
    for m in engine.mounts():  # a failing test must not leave its mounts to the leftover check
        engine.unmount(m.id, force=True)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def command(main: Callable[[list[str]], int], argv: list[str],
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """An ``imgmount``/``imgumount`` command run in-process, as root: its status, stdout and stderr."""
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def shown(mountpoint: Path, files: dict[str, bytes]) -> list[str]:
    """The files a mount shows exactly as they were written."""
    return sorted(n for n, data in files.items()
                  if (mountpoint / n).is_file() and (mountpoint / n).read_bytes() == data)


def tool_says_pending(c: Crashed, work: Path) -> bool:
    """What the filesystem's own tools say of the image: needs_recovery, a dirty log, a log tree."""
    raw = c.image
    if c.fmt != "raw":
        raw = work / "check.raw"
        images.run(["qemu-img", "convert", "-f", c.fmt, "-O", "raw", str(c.image), str(raw)])
    with images.loop(raw, c.offset, c.size, read_only=True) as dev:
        if c.fstype == "ext4":
            return "needs_recovery" in images.run(["dumpe2fs", "-h", dev])
        if c.fstype == "xfs":
            return "state: <DIRTY>" in images.run(["xfs_logprint", "-t", dev])
        super_ = images.run(["btrfs", "inspect-internal", "dump-super", dev])
        found = re.search(r"^log_root\s+(\d+)", super_, re.M)
        return found is not None and found.group(1) != "0"


def overlay_servers(under: Path) -> dict[int, list[str]]:
    """The overlay servers of mounts whose state is ``under`` a directory, each with its open files."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"qemu-storage-daemon" in argv[0] and any(b"backing=lower" in a for a in argv) \
                    and any(os.fsencode(under) in a for a in argv):
                found[int(pid)] = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
    return found


def ours(left: list[str], *paths: Path) -> list[str]:
    """What is left of this test's own making (other tests may run beside it on this host)."""
    return [x for x in left if any(str(p) in x for p in paths)]


def named_overlays() -> set[str]:
    return {p.name for p in OVERLAY_DIR.glob("imgmount-overlay-*")}


# ---- what --info says ---------------------------------------------------------------------------------------


def test_info_flags_a_filesystem_that_needs_recovery(crashed: Crashed, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert tool_says_pending(crashed, tmp_path), "the crash left nothing to recover: the test proves nothing"
    status, out, _ = command(cli.imgmount_main, ["--info", "--json", str(crashed.image)], capsys)
    assert status == 0
    entry = next(v for v in json.loads(out)["volumes"] if v["name"] == crashed.volume)
    assert entry["filesystem"]["type"] == crashed.fstype
    assert entry["needs-recovery"] is True
    status, out, _ = command(cli.imgmount_main, ["--info", str(crashed.image)], capsys)
    assert status == 0
    line = next(x for x in out.splitlines() if crashed.fstype in x.split())
    assert recovery.describe(crashed.fstype, recovery.PENDING) in line


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_a_cleanly_unmounted_filesystem_needs_none(tmp_path: Path, fstype: str) -> None:
    raw = images.blank(tmp_path / "clean.raw", 128 * MiB)
    images.format_region(raw, 0, 128 * MiB, fstype, files={"a": b"x" * 4096})  # mounted, written, unmounted
    with open(raw, "rb") as f:
        sig = probe(FileReader(f.fileno()))
    assert sig is not None and sig.type == fstype
    assert not sig.needs_recovery


# ---- a read-only mount replays into an overlay ----------------------------------------------------------------


def test_read_only_mount_shows_every_acknowledged_file_and_writes_nothing(
        crashed: Crashed, state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before, digest, names = leftovers.snapshot(), sha256(crashed.image), named_overlays()
    status, out, err = command(cli.imgmount_main, [str(crashed.image), "--mount-root", str(tmp_path / "media"),
                                                   "--json"], capsys)
    assert status == 0, err
    mounted = json.loads(out)
    assert (mounted["backend"], mounted["read_only"]) == (crashed.backend, True)
    (volume,) = mounted["volumes"]
    mountpoint = Path(volume["mountpoint"])
    assert shown(mountpoint, crashed.files) == sorted(crashed.files)
    assert "recent writes" not in err
    with pytest.raises(OSError, match="Read-only file system"):
        (mountpoint / "new").write_bytes(b"x")
    assert file_usage(str(crashed.image)).state == READ_ONLY
    with pytest.raises(RuntimeError), running_vm(f"file={crashed.image},format={crashed.fmt}"):
        pass  # a VM that would write the image cannot start
    with running_vm(f"file={crashed.image},format={crashed.fmt},readonly=on"):
        pass  # one that only reads it can, as beside any read-only user
    (server,) = overlay_servers(tmp_path).values()
    assert any(t.startswith(str(OVERLAY_DIR)) and t.endswith("(deleted)") for t in server), \
        f"the overlay should be a file without a name, open only in its server: {server}"
    assert named_overlays() == names
    status, _, err = command(cli.imgumount_main, [str(crashed.image)], capsys)
    assert status == 0, err
    assert not mountpoint.exists()
    assert sha256(crashed.image) == digest, "the read-only mount wrote to the image"
    assert ours(leftovers.snapshot().new_since(before), tmp_path, crashed.image) == []
    assert overlay_servers(tmp_path) == {}
    assert named_overlays() == names


def test_read_write_mount_replays_into_the_image(crashed: Crashed, state: Path, tmp_path: Path) -> None:
    image = tmp_path / crashed.image.name
    shutil.copyfile(crashed.image, image)
    copy = Crashed(image, crashed.fmt, crashed.fstype, crashed.volume, crashed.offset, crashed.size,
                   crashed.files)
    engine = Engine(settings=Settings(state_dir=state))
    info = engine.mount(MountRequest(image=str(image), read_only=False, mount_root=str(tmp_path / "media")))
    assert shown(Path(info.volumes[0].mountpoint), crashed.files) == sorted(crashed.files)
    assert overlay_servers(tmp_path) == {}, "a read-write mount needs no overlay: the replay goes to the image"
    engine.unmount(info.id)
    assert not tool_says_pending(copy, tmp_path)


@pytest.mark.parametrize("crashed", [("qcow2", "ext4")], indirect=True, ids=["qcow2-ext4"])
def test_a_callers_own_server_stays_read_only_below_the_overlay(crashed: Crashed, state: Path) -> None:
    """A non-root caller's image is served by a QEMU of hers (read-only, as always); the overlay is root's
    and reads only the volume's block device."""
    user = pwd.getpwnam(CALLER)
    home = world_dir("imgmount-recovery-")
    try:
        image = home / crashed.image.name
        shutil.copyfile(crashed.image, image)
        os.chown(image, user.pw_uid, user.pw_gid)
        digest, engine = sha256(image), Engine(settings=Settings(state_dir=state))
        info = engine.mount(MountRequest(image=str(image), mount_root=str(home / "media"), owner=user.pw_uid),
                            confined=Credentials(user.pw_uid, (user.pw_gid,)))
        layers = [(x.kind, x.volume, x.identity.get("read_only")) for x in engine.journal.read(info.id).layers]
        assert layers[:2] == [("server", "", True), ("fuse", "", True)]
        assert ("fuse", "p1", False) in layers
        assert shown(Path(info.volumes[0].mountpoint), crashed.files) == sorted(crashed.files)
        engine.unmount(info.id)
        assert sha256(image) == digest
    finally:
        shutil.rmtree(home)


# ---- what is left after a crash of ours -------------------------------------------------------------------------


def running(pid: int) -> bool:
    """Not gone, and not a zombie that is waiting to be reaped (its descriptors are closed already)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def holders_of(target: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("crashed", [("qcow2", "ext4")], indirect=True, ids=["qcow2-ext4"])
def test_the_overlay_outlives_a_crashed_engine_and_goes_at_unmount(crashed: Crashed, state: Path,
                                                                   tmp_path: Path) -> None:
    info = Engine(settings=Settings(state_dir=state)).mount(MountRequest(image=str(crashed.image), mount_root=str(tmp_path / "media")))
    (pid, files), = overlay_servers(tmp_path).items()
    overlay = next(t for t in files if t.startswith(str(OVERLAY_DIR)))
    # The engine is gone (as when the daemon is killed): a new one over the same journal adopts the mount.
    engine = Engine(settings=Settings(state_dir=state))
    assert engine.verify(info.id) == []
    assert shown(Path(info.volumes[0].mountpoint), crashed.files) == sorted(crashed.files)
    engine.unmount(info.id)
    assert not running(pid), "the overlay's server should be stopped with the mount"
    assert holders_of(overlay) == [], "nothing may keep the overlay alive once the mount is gone"


@pytest.mark.parametrize(("crashed", "layers"), [(("raw", "ext4"), 4), (("qcow2", "ext4"), 5)],
                         indirect=["crashed"], ids=["raw-ext4", "qcow2-ext4"])
def test_a_fault_at_every_step_of_a_replaying_mount_leaves_nothing(crashed: Crashed, layers: int, state: Path,
                                                                   tmp_path: Path) -> None:
    """IMGMOUNT_FAULT_AT=N fails the N-th step (before or after each layer: disk, overlay server, its loop
    device, mount); each is undone, overlay included, and the image is never written."""
    digest, before, media = sha256(crashed.image), leftovers.snapshot(), tmp_path / "media"
    for step in range(1, 2 * layers + 2):
        engine = Engine(settings=Settings(state_dir=state, fault_at=step))
        try:
            info = engine.mount(MountRequest(image=str(crashed.image), mount_root=str(media)))
        except InjectedFault as exc:
            assert f"step {step}" in str(exc)
            assert ours(leftovers.snapshot().new_since(before), tmp_path, crashed.image) == [], f"step {step}"
            assert overlay_servers(tmp_path) == {} and engine.mounts() == []
            continue
        assert step == 2 * layers + 1, "the mount took other steps than disk, overlay, loop device and mount"
        assert shown(Path(info.volumes[0].mountpoint), crashed.files) == sorted(crashed.files)
        engine.unmount(info.id)
    assert sha256(crashed.image) == digest


# ---- no replay ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crashed", [("raw", "ext4")], indirect=True, ids=["raw-ext4"])
def test_asking_for_no_replay_shows_the_filesystem_without_its_journal(crashed: Crashed, state: Path,
                                                                        tmp_path: Path) -> None:
    engine = Engine(settings=Settings(state_dir=state))
    info = engine.mount(MountRequest(image=str(crashed.image), mount_root=str(tmp_path / "media"),
                                     mount_options=("noload",)))
    assert info.volumes[0].device == info.device, "no overlay: the filesystem is mounted from the image"
    assert len(shown(Path(info.volumes[0].mountpoint), crashed.files)) < FILES
    engine.unmount(info.id)


@pytest.mark.parametrize("crashed", [("raw", "ext4")], indirect=True, ids=["raw-ext4"])
def test_where_no_overlay_can_be_made_the_mount_says_recent_writes_are_not_shown(
        crashed: Crashed, state: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # A host without qemu-storage-daemon or /dev/fuse, as the start-up check would find it (named: a fake).
    without_exports = replace(check_host(), fuse=False)
    digest, engine = sha256(crashed.image), Engine(settings=Settings(state_dir=state), host=without_exports)
    with caplog.at_level(logging.WARNING, logger="mountd.engine.volumes"):
        info = engine.mount(MountRequest(image=str(crashed.image), mount_root=str(tmp_path / "media")))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "recent writes are not shown" in warning and "qemu-storage-daemon" in warning
    (layer,) = [x for x in engine.journal.read(info.id).layers if x.kind == "mount"]
    assert layer.identity["note"].startswith("recent writes are not shown")
    assert len(shown(Path(info.volumes[0].mountpoint), crashed.files)) < FILES
    engine.unmount(info.id)
    assert sha256(crashed.image) == digest


# ---- the parsers ---------------------------------------------------------------------------------------------


def test_xfs_log_state_is_read_as_xfs_logprint_reads_it(tmp_path: Path) -> None:
    """Clean and dirty logs, with the head anywhere, before and after the log wraps."""
    raw = images.blank(tmp_path / "xfs.raw", 128 * MiB)
    with images.loop(raw) as dev:
        images.run(["mkfs.xfs", "-q", "-f", "-l", "size=2560b", dev],
                   env={"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"})
    seen = []
    for _ in range(5):
        crash = tmp_path / "crash.raw"
        with images.loop(raw) as dev, images.mounted(dev) as mnt:
            _churn(mnt, 3000)
            os.sync()
            subprocess.run(["cp", "--sparse=always", str(raw), str(crash)], check=True)
        for image, dirty in ((crash, True), (raw, False)):
            logprint = images.run(["xfs_logprint", "-t", str(image)])
            assert (f"state: <{'DIRTY' if dirty else 'CLEAN'}>" in logprint), logprint[:400]
            with open(image, "rb") as f:
                assert recovery.pending("xfs", FileReader(f.fileno())) == (recovery.PENDING if dirty else "")
            seen.append(re.search(r"head: (\d+)", logprint).group(1))  # type: ignore[union-attr]
    assert len(set(seen)) == len(seen), "each round should leave the head somewhere else"


def _churn(mnt: Path, count: int) -> None:
    for i in range(count):
        d = mnt / f"d{i % 40}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").touch()
    for i in range(40):
        shutil.rmtree(mnt / f"d{i}")
