"""Encrypted disks on a real kernel: partition -> dm-crypt -> LVM -> filesystem (issue 10, item 1).

Images are laid out as Ubuntu's installer does "encrypt the disk" (ESP, /boot, LUKS2 -> ``vgubuntu`` ->
``root`` + ``swap_1``) and as a LUKS1 data partition (ext4 directly inside), built with cryptsetup, LVM and
mkfs in this kernel. The engine runs in-process with the keys a caller gives (``MountRequest.keys``).
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.crypt_layouts import CryptGuest, luks1_partition, luks_format, ubuntu_encrypted
from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.errors import InvalidArgumentError, OperationTimeoutError
from mountd.keys import Keys
from mountd.layers import crypt
from mountd.layers.layer import InjectedFault
from mountd.model import MountInfo, MountRequest
from mountd.settings import Settings
from tests.support import guests, leftovers
from tests.support.engines import engine_in
from tests.support.secret_scan import files_holding, scanning_processes

SECRET = b"Ubuntu disk passphrase, 2026!"
WRONG = b"not the passphrase"
UBUNTU = ("p2", "vgubuntu/root")
#: LUKS1 on-disk format: 8 key slots of 48 bytes from byte 208, each "active" then "iterations" (big-endian).
LUKS1_SLOT0_ITERATIONS = 208 + 4


@pytest.fixture(scope="module")
def ubuntu(tmp_path_factory: pytest.TempPathFactory) -> CryptGuest:
    built = ubuntu_encrypted(tmp_path_factory.mktemp("ubuntu") / "ubuntu.raw", SECRET)
    qcow2 = images.convert(built.raw, built.raw.with_suffix(".qcow2"), "qcow2")
    built.raw.unlink()
    return CryptGuest(qcow2, SECRET, built.files, built.fstypes)


@pytest.fixture
def engine(scratch: Path) -> Iterator[Engine]:
    with engine_in(scratch / "state") as eng:
        yield eng


def _mount(engine: Engine, image: Path, root: Path, keys: Keys, **kw: object) -> MountInfo:
    request = MountRequest(image=str(image), mount_root=str(root), keys=keys, **kw)  # type: ignore[arg-type]
    return engine.mount(request)


def _check(info: MountInfo, guest: CryptGuest, names: tuple[str, ...]) -> None:
    mounted = {v.name: v for v in info.volumes}
    assert set(names) <= set(mounted) and not {"p3", "vgubuntu/swap_1"} & set(mounted)
    for name in names:
        assert mounted[name].filesystem == guest.fstypes[name]
        guests.check_files(Path(mounted[name].mountpoint), guest.files[name])


def _ours_gone(info: MountInfo) -> None:
    dm = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    assert f"imgmount-{info.id}" not in dm, dm
    if info.device.startswith("/dev/nbd"):
        sysfs = Path("/sys/block") / Path(info.device).name
        assert not (sysfs / "pid").exists() and int((sysfs / "size").read_text()) == 0


def test_ubuntu_layout_read_only_and_the_secret_is_nowhere(engine: Engine, ubuntu: CryptGuest, scratch: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with scanning_processes([SECRET]) as seen:
        info = _mount(engine, ubuntu.raw, scratch / "media", Keys(everywhere=SECRET))
    assert seen == set()
    _check(info, ubuntu, UBUNTU)
    layers = [(r.volume, r.kind) for r in engine.journal.read(info.id).layers if r.kind != "mount"]
    assert [k for v, k in layers if v == "p3"] == ["partition", "crypt"]
    assert ("vgubuntu/root", "dm") in layers
    root = next(v for v in info.volumes if v.name == "vgubuntu/root")
    with pytest.raises(OSError, match="Read-only file system"):
        (Path(root.mountpoint) / "new").write_bytes(b"x")
    assert any((scratch / "state").rglob("*.json")) and files_holding([SECRET], [scratch / "state"]) == []
    engine.unmount(info.id)
    _ours_gone(info)
    assert SECRET.decode() not in caplog.text and "cryptsetup open" in caplog.text


def test_read_write_persists(engine: Engine, ubuntu: CryptGuest, scratch: Path) -> None:
    data = os.urandom(3 << 20)
    keys = Keys(by_volume={"p3": SECRET})
    info = _mount(engine, ubuntu.raw, scratch / "media", keys, read_only=False, volumes=("vgubuntu/root",))
    (Path(info.volumes[0].mountpoint) / "written.bin").write_bytes(data)
    engine.unmount(info.id)
    _ours_gone(info)
    again = _mount(engine, ubuntu.raw, scratch / "media", keys, volumes=("vgubuntu/root",))
    assert (Path(again.volumes[0].mountpoint) / "written.bin").read_bytes() == data
    engine.unmount(again.id)
    _ours_gone(again)


def test_wrong_passphrase_is_one_sentence_and_leaves_nothing(engine: Engine, ubuntu: CryptGuest,
                                                             scratch: Path) -> None:
    before = leftovers.snapshot()
    with pytest.raises(InvalidArgumentError) as needed:  # no key: this host opens LUKS2, so it is asked for
        _mount(engine, ubuntu.raw, scratch / "media", Keys())
    assert str(needed.value).startswith("volume p3 is locked (LUKS2): give its passphrase")
    assert engine.mounts() == [] and leftovers.snapshot().new_since(before) == []
    with pytest.raises(InvalidArgumentError) as caught:
        _mount(engine, ubuntu.raw, scratch / "media", Keys(everywhere=WRONG))
    assert str(caught.value).startswith("wrong passphrase or key file for volume p3 (LUKS2 on /dev/nbd")
    assert str(caught.value).endswith(": it does not open it): check it and try again")
    assert WRONG.decode() not in str(caught.value)
    assert engine.mounts() == [] and leftovers.snapshot().new_since(before) == []
    info = _mount(engine, ubuntu.raw, scratch / "media", Keys(by_volume={"p3": WRONG}, everywhere=SECRET))
    _check(info, ubuntu, UBUNTU)  # the next try works; a wrong key before the right one costs nothing
    engine.unmount(info.id)


#: Each image's attach steps, by what they name ("after crypt p3"), as found once (they do not change).
_STEPS: dict[Path, dict[str, int]] = {}


def _fault_steps(scratch: Path, image: Path, until: str = "after crypt p3") -> dict[str, int]:
    """The attach steps of ``image`` up to ``until``, found by failing each step in turn; every failure must
    leave nothing behind."""
    if until in _STEPS.get(image, {}):
        return _STEPS[image]
    steps: dict[str, int] = {}
    for step in range(1, 16):
        engine = Engine(Journal(str(scratch / "state")), settings=Settings(fault_at=step))
        before = leftovers.snapshot()
        with pytest.raises(InjectedFault) as caught:
            _mount(engine, image, scratch / "media", Keys(everywhere=SECRET))
        assert engine.mounts() == [] and leftovers.snapshot().new_since(before) == [], caught.value
        steps[str(caught.value).rpartition("(")[2].rstrip(")")] = step
        if until in steps:
            _STEPS[image] = steps
            return steps
    raise AssertionError(f"no attach step {until}: only {steps}")


def test_rollback_at_each_step_up_to_the_crypt_layer(ubuntu: CryptGuest, scratch: Path) -> None:
    steps = _fault_steps(scratch, ubuntu.raw)
    assert steps["after crypt p3"] == steps["before crypt p3"] + 1


CRASHING_MOUNT = """
import sys
from pathlib import Path
from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.keys import Keys
from mountd.model import MountRequest
from mountd.settings import Settings
state, image, media, step = sys.argv[1:]
engine = Engine(Journal(state), settings=Settings(crash_at=int(step)))
engine.mount(MountRequest(image, mount_root=media, keys=Keys(everywhere=sys.stdin.buffer.read())))
"""


def test_a_restart_verifies_a_whole_mount_and_tears_down_a_crashed_one(ubuntu: CryptGuest, scratch: Path) -> None:
    state = scratch / "state"
    info = _mount(Engine(Journal(str(state))), ubuntu.raw, scratch / "media", Keys(everywhere=SECRET))
    restarted = Engine(Journal(str(state)))  # a new daemon: the journal, and no secret
    assert restarted.verify(info.id) == [] and restarted.clean_up(info.id) == info
    restarted.unmount(info.id)
    _ours_gone(info)
    step = _fault_steps(scratch, ubuntu.raw)["after crypt p3"]
    before = leftovers.snapshot()
    crashed = subprocess.run([sys.executable, "-c", CRASHING_MOUNT, str(state), str(ubuntu.raw),
                              str(scratch / "media"), str(step)], input=SECRET, capture_output=True, timeout=300,
                             check=False)
    assert crashed.returncode == -9, crashed.stderr
    (record,) = Journal(str(state)).all()
    assert [r.kind for r in record.layers][-1] == "crypt"
    assert Engine(Journal(str(state))).clean_up(record.id) is None
    assert leftovers.snapshot().new_since(before) == [] and Journal(str(state)).all() == []


def test_luks1_partition_with_ext4_inside(engine: Engine, scratch: Path) -> None:
    guest = luks1_partition(scratch / "luks1.raw", SECRET)
    info = _mount(engine, guest.raw, scratch / "media", Keys(by_volume={"p2": SECRET}))
    assert info.backend == "loop"
    assert {v.name: v.filesystem for v in info.volumes} == {"p1": "ext4", "p2": "ext4"}
    for v in info.volumes:
        guests.check_files(Path(v.mountpoint), guest.files[v.name])
    engine.unmount(info.id)
    _ours_gone(info)


def test_a_crafted_key_slot_is_bounded_in_time(engine: Engine, scratch: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """LUKS1 has no header checksum: key slot 0 patched to ask for 2^32 - 1 PBKDF2 iterations (hours). The
    bound (OPEN_TIMEOUT, 60 s) is shortened to 10 s here: what is tested is that there is one, and what
    reaching it leaves (nothing) and says."""
    monkeypatch.setattr(crypt, "OPEN_TIMEOUT", 10.0)
    raw = images.blank(scratch / "crafted.raw", 24 << 20)  # a partition: a whole-disk LUKS file is QEMU's
    images.partition(raw, "label: gpt\nsize=16MiB\n")
    offset = images.sfdisk_json(raw)["partitions"][0]["start"] * 512
    with images.loop(raw, offset, 16 << 20) as dev:  # cryptsetup cannot format a file on the lane's 9p share
        luks_format(dev, SECRET, 1)
    with open(raw, "r+b") as f:
        f.seek(offset + LUKS1_SLOT0_ITERATIONS)
        f.write(struct.pack(">I", 0xFFFFFFFF))
    before = leftovers.snapshot()
    start = time.monotonic()
    with pytest.raises(OperationTimeoutError) as caught:
        _mount(engine, raw, scratch / "media", Keys(everywhere=SECRET))
    assert time.monotonic() - start < crypt.OPEN_TIMEOUT + 30
    assert str(caught.value) == ("unlocking volume p1 took more than 10 s: its key slots ask for "
                                 "more key derivation than a real volume does (a damaged or crafted header)")
    assert engine.mounts() == [] and leftovers.snapshot().new_since(before) == []
