"""The privilege boundary, attacked as a local user would (design: "The guarantee"; issue 8).

A second user (uid of the account ``daemon``, in group ``imgmount``, no polkitd) calls the real imgmountd on a
private bus. She owns a directory and images with known content (``whoami`` = ``decoy``, label ``decoy``), and
knows where root keeps an image she cannot read (``whoami`` = ``SECRET``, label ``SECRET``, its own size and
UUID). Her attacker process (:mod:`tests.support.attacker`, her uid) watches her directory with inotify and,
after the K-th open of her image that it observes, swaps a name for a symlink to root's image or rewrites her
header in place. Every outcome is checked as root: what the mounted volume shows, which inode each loop device
is backed by, which process holds root's image open, the Mount object's ``Image``, root's image's bytes, and
every error text she receives.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imgmount_testkit import images
from imgmount_testkit.bus import REPO, Bus, world_dir
from imgmount_testkit.client import Client, client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import OtherUser, as_user
from mountd.service.dbusapi import ERROR_PREFIX, MOUNT_IFACE
from tests.support.attacker import Attacker

pytestmark = pytest.mark.host

#: Tries per open position (the K-th observed open after which the attacker acts).
TRIES = 20
#: Positions tried at least, whatever the dry run counted: 1..3.
MIN_POSITIONS = 3
#: Positions tried at most: a bound on the run time should some version open the image many more times.
MAX_POSITIONS = 12
#: Attackers at work at the same time (on files of their own): the host lane has two cores.
PARALLEL = 2
#: Problems shown per attacker in a failure message.
SHOWN = 12

MiB = images.MiB
DECOY_SIZE = 16 * MiB
SECRET_SIZE = 24 * MiB
#: What her rewritten header claims (more than root's image holds, so its filesystem fits; not root's size,
#: which she does not know: telling her what she wrote herself tells her nothing).
VARIANT_SIZE = 25 * MiB
DECOY_LABEL = "decoy"
SECRET_LABEL = "SECRET"
DECOY_UUID = "dec0dec0-0000-4000-8000-000000000001"
SECRET_UUID = "5ec2e75e-0000-4000-8000-00000000beef"
SECRET_MARKERS = (SECRET_LABEL, SECRET_UUID, str(SECRET_SIZE), str(SECRET_SIZE // 512))

ATTACKER = "daemon"  # an existing unprivileged account; its uid and primary gid

LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64 = struct.Struct("QQQQQIIII64s64s32sQQ")
QCOW2_EXT_DATA_FILE = 0x44415441


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ids(group: int) -> tuple[int, int, tuple[int, ...]]:
    """The attacker's uid, gid and groups."""
    entry = pwd.getpwnam(ATTACKER)
    return entry.pw_uid, entry.pw_gid, (group,)


@pytest.fixture
def caller(bus: Bus, daemon: Daemon, ids: tuple[int, int, tuple[int, ...]]) -> Iterator[OtherUser]:
    user = OtherUser(bus, *ids)
    yield user
    user.close()


@pytest.fixture
def attacker(ids: tuple[int, int, tuple[int, ...]]) -> Iterator[Attacker]:
    a = Attacker(as_user(*ids), REPO)
    yield a
    a.close()


@dataclass(frozen=True)
class Pristine:
    """Images built once, kept where only root can read them; each test copies what it needs."""

    home: Path
    decoy_raw: Path
    secret_raw: Path
    decoy_qcow2: Path
    secret_qcow2: Path


@pytest.fixture(scope="module")
def pristine() -> Iterator[Pristine]:
    home = Path(tempfile.mkdtemp(prefix="imgmount-boundary-pristine-"))  # 0700, root's
    decoy = images.blank(home / "decoy.raw", DECOY_SIZE)
    images.format_region(decoy, 0, DECOY_SIZE, "ext4", label=DECOY_LABEL, uuid=DECOY_UUID,
                         files={"whoami": b"decoy"})
    secret = images.blank(home / "secret.raw", SECRET_SIZE)
    images.format_region(secret, 0, SECRET_SIZE, "ext4", label=SECRET_LABEL, uuid=SECRET_UUID,
                         files={"whoami": b"SECRET"})
    yield Pristine(home, decoy, secret, images.convert(decoy, home / "decoy.qcow2", "qcow2"),
                   images.convert(secret, home / "secret.qcow2", "qcow2"))
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    path = world_dir("imgmount-boundary-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Scene:
    """One test's files: ``vault`` (root's, 0700) and ``home`` (the attacker's, 0755), side by side."""

    base: Path
    vault: Path
    home: Path
    uid: int
    gid: int

    def mine(self, path: Path, mode: int = 0o644) -> Path:
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
        if not path.is_symlink():
            path.chmod(mode)
        return path

    def root_only(self, path: Path) -> Path:
        os.chown(path, 0, 0)
        path.chmod(0o700 if path.is_dir() else 0o600)
        return path

    def sub(self, name: str) -> Scene:
        """A scene of its own inside this one (for a second attacker at the same time)."""
        base = self.base / re.sub(r"[^\w-]+", "-", name)
        base.mkdir(mode=0o755)
        return make_scene(base, self.uid, self.gid)


def make_scene(base: Path, uid: int, gid: int) -> Scene:
    s = Scene(base, base / "vault", base / "mallory", uid, gid)
    s.vault.mkdir()
    s.root_only(s.vault)
    s.home.mkdir()
    s.mine(s.home, 0o755)
    return s


@pytest.fixture
def scene(shared: Path, ids: tuple[int, int, tuple[int, ...]]) -> Iterator[Scene]:
    base = Path(tempfile.mkdtemp(dir=shared))
    base.chmod(0o755)
    uid, gid, _ = ids
    yield make_scene(base, uid, gid)
    shutil.rmtree(base, ignore_errors=True)


# --- what root sees -----------------------------------------------------------------------------------------


Key = tuple[int, int, int]  # major, minor, inode of a file


def key_of(path: Path | str) -> Key:
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def loop_backing(dev: str) -> Key:
    """The file a loop device reads (LOOP_GET_STATUS64: the backing inode the kernel holds, not a name)."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(LOOP_INFO64.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    finally:
        os.close(fd)
    lo_device, lo_inode = LOOP_INFO64.unpack(bytes(buf))[:2]
    return os.major(lo_device), os.minor(lo_device), lo_inode


def who_holds(path: Path, key: Key) -> list[str]:
    """Every loop device backed by, and every process holding a descriptor of, the file ``key`` at ``path``.

    Loop devices by sysfs (the kernel's name for the backing file: ``path`` has one link and is never
    renamed), not by opening them: an open here would make another attacker's unmount fail as busy."""
    found = []
    for dev in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            if (dev / "loop" / "backing_file").read_text().strip().removesuffix(" (deleted)") == str(path):
                found.append(f"loop device /dev/{dev.name}")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if key_of(f"/proc/{pid}/fd/{fd}") == key:
                        found.append(f"process {Path(f'/proc/{pid}/comm').read_text().strip()}")
    return found


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def secret_facts(text: str) -> list[str]:
    """The markers of root's image (label, content, UUID, size) that ``text`` contains."""
    return [m for m in SECRET_MARKERS if m in text]


def error_problems(reply: Any, allowed: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with an error reply: not one of ours, an internal error, or root's facts in the text."""
    problems = []
    name = reply.error or ""
    if not name.startswith(ERROR_PREFIX):
        problems.append(f"not an imgmount error: {name}: {reply.text}")
    elif name == ERROR_PREFIX + "Failed":  # the daemon's own faults: what she did wrong has a name of its own
        problems.append(f"Failed, not a clear error (InvalidImage, NotAuthorized, NotFound ...): {reply.text}")
    elif allowed and name.removeprefix(ERROR_PREFIX) not in allowed:
        problems.append(f"{name.removeprefix(ERROR_PREFIX)}, not one of {'/'.join(allowed)}: {reply.text}")
    if facts := secret_facts(reply.text):
        problems.append(f"the error text tells {facts} of root's image: {reply.text}")
    return problems


@dataclass(frozen=True)
class Target:
    """What the attacker asked for, and what root's image is."""

    given: Path  # the path in her call
    decoy: Key  # the inode of her decoy at that path before any swap
    secret: Path
    secret_key: Key

    def names_decoy(self, image: str) -> bool:
        """``Image`` names her file: the path she gave (as the kernel names it after a swap: " (deleted)"),
        or a name that is her decoy's inode now."""
        if image.removesuffix(" (deleted)") == str(self.given):
            return True
        try:
            return key_of(image) == self.decoy
        except OSError:
            return False


def ext4_label(dev: str) -> bytes:
    """The volume name in the ext4 superblock on ``dev``, read as root."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, 16, 1024 + 0x78).rstrip(b"\0")
    finally:
        os.close(fd)


def mount_problems(c: Client, path: str, target: Target, *, exact: bool) -> list[str]:
    """What a mount made for the attacker gives away, seen as root while it is mounted: its volumes' files and
    labels, its loop devices' backing inodes, who holds root's image, its ``Image``. ``exact``: each volume
    must be her decoy's; else (her header rewritten while QEMU reads it: she may get garbage of her own
    files) only root's bytes count."""
    props = c.props(path, MOUNT_IFACE)
    problems = []
    image = str(props["Image"])
    if image == str(target.secret) or str(target.secret.parent) in image:
        problems.append(f"Image names root's image: {image}")
    elif not target.names_decoy(image):
        problems.append(f"Image names neither the path given nor the decoy: {image}")
    if not props["Volumes"]:
        problems.append("no volume mounted")
    for name, dev, _fs, mountpoint in props["Volumes"]:
        try:
            whoami = (Path(mountpoint) / "whoami").read_bytes()
        except OSError as exc:
            whoami = f"unreadable ({exc.strerror})".encode()
        try:
            label = ext4_label(dev)
        except OSError as exc:
            label = f"unreadable ({exc.strerror})".encode()
        if b"SECRET" in whoami or (exact and whoami != b"decoy"):
            problems.append(f"volume {name} ({dev}) shows whoami = {whoami!r}")
        if label == SECRET_LABEL.encode() or (exact and label != DECOY_LABEL.encode()):
            problems.append(f"volume {name} ({dev}) has the label {label!r}")
    if props["Backend"] == "loop":
        for dev in dict.fromkeys([str(props["Device"]), *(v[1] for v in props["Volumes"])]):
            backing = loop_backing(dev)
            if backing != target.decoy:
                what = "root's image" if backing == target.secret_key else f"inode {backing}"
                problems.append(f"{dev} is backed by {what}, not the decoy {target.decoy}")
    problems += [f"while mounted, {h} holds root's image" for h in who_holds(target.secret, target.secret_key)]
    return problems


def inspect_problems(reply: Any, *, exact: bool) -> list[str]:
    """An Inspect answer must tell nothing of root's image (or be a clear error); ``exact``: and describe the
    decoy (else her own rewritten header may describe what she wrote into it)."""
    if reply.error is not None:
        return error_problems(reply)
    text = json.dumps(reply.body)
    problems = [f"Inspect tells {f} of root's image" for f in secret_facts(text)]
    found = reply.body[0]
    labels = [(v.get("filesystem") or {}).get("label") for v in found.get("volumes", [])]
    if exact and (found.get("virtual-size") != DECOY_SIZE or DECOY_LABEL not in labels):
        problems.append(f"Inspect does not describe the decoy: size {found.get('virtual-size')}, labels {labels}")
    return problems


# --- the race ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes per open position, for the failure message (and the report)."""

    label: str
    rows: dict[int, collections.Counter[str]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)  # problem -> the tries that showed it
    dry_run_opens: int = 0
    seconds: float = 0.0

    def add(self, k: int, i: int, outcome: str, problems: list[str]) -> None:
        self.rows.setdefault(k, collections.Counter())[outcome] += 1
        for p in problems:
            self.problems.setdefault(p, []).append(f"{k}/{i}")

    def report(self) -> list[str]:
        """Each distinct problem once, with the tries (open position/try) that showed it."""
        out = []
        for problem, where in list(self.problems.items())[:SHOWN]:
            tries = ", ".join(where[:8]) + (f" and {len(where) - 8} more" if len(where) > 8 else "")
            out.append(f"  {len(where)}x (open/try {tries}): {problem}")
        if len(self.problems) > SHOWN:
            out.append(f"  ... and {len(self.problems) - SHOWN} more distinct problems")
        return out

    def summary(self) -> str:
        return (f"{self.label} ({self.seconds:.0f} s; the unattacked call opened it {self.dry_run_opens} times): "
                + "; ".join(f"after open {k}: " + ", ".join(f"{n}x {o}" for o, n in sorted(row.items()))
                            for k, row in sorted(self.rows.items())))


NO_SWAP = " (no swap: fewer opens)"


@dataclass
class Race:
    """One attack, tried at every open position: ``call`` makes the attacker's call; ``examine`` checks its
    outcome as root and cleans up (unmount); ``fire`` is what she does after the K-th open; ``reset`` puts her
    files back before the next try; ``after_try`` checks root's image once the try is undone."""

    attacker: Attacker
    watch: Path
    name: str
    call: Callable[[], Any]
    examine: Callable[[Any], tuple[str, list[str]]]
    fire: list[list[Any]]
    reset: Callable[[], None]
    after_try: Callable[[], list[str]]

    def attempt(self, k: int) -> tuple[dict[str, Any], str, list[str]]:
        self.attacker.arm(self.watch, self.name, k, *self.fire)
        try:
            reply = self.call()
        finally:
            seen = self.attacker.stop()
        outcome, problems = self.examine(reply)
        problems += self.after_try()
        self.reset()
        if seen["fire_error"]:
            problems.append(f"the attacker's own swap failed: {seen['fire_error']}")
        return seen, outcome, problems

    def run(self, label: str) -> Tally:
        tally = Tally(label)
        started = time.monotonic()
        seen, outcome, problems = self.attempt(0)  # the dry run: a control, and the count of opens
        assert not problems and outcome == "ok", f"{label}: the unattacked call does not work: {outcome} {problems}"
        opens = tally.dry_run_opens = int(seen["opens"])
        assert opens >= 1, f"{label}: the attacker saw no open of {self.name}: {seen['events']}"
        for k in range(1, min(max(opens, MIN_POSITIONS), MAX_POSITIONS) + 1):
            for i in range(TRIES):
                seen, outcome, problems = self.attempt(k)
                tally.add(k, i + 1, outcome + ("" if seen["fired"] else NO_SWAP), problems)
        tally.seconds = time.monotonic() - started
        unfired = sum(n for o, n in tally.rows[1].items() if o.endswith(NO_SWAP))
        assert unfired == 0, f"the first open was not seen in every try: {tally.summary()}"
        return tally


def mount_examiner(c: Client, target: Target, *, exact: bool) -> Callable[[Any], tuple[str, list[str]]]:
    def examine(reply: Any) -> tuple[str, list[str]]:
        if reply.error is not None:
            return reply.error.removeprefix(ERROR_PREFIX), error_problems(reply)
        path = reply.body[0]
        try:
            problems = mount_problems(c, path, target, exact=exact)
        finally:
            unmounted = c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}])
        if unmounted.error is not None:
            problems.append(f"unmount failed: {unmounted.error}: {unmounted.text}")
        leaked = any("SECRET" in p or "root's image" in p for p in problems)
        return ("SECRET mounted" if leaked else "mounted, with problems" if problems else "ok"), problems

    return examine


def inspect_examiner(*, exact: bool) -> Callable[[Any], tuple[str, list[str]]]:
    def examine(reply: Any) -> tuple[str, list[str]]:
        problems = inspect_problems(reply, exact=exact)
        if reply.error is not None:
            return reply.error.removeprefix(ERROR_PREFIX), problems
        leaked = any("root's image" in p for p in problems)
        return ("SECRET inspected" if leaked else "inspected, with problems" if problems else "ok"), problems

    return examine


def roots_image_untouched(target: Target) -> Callable[[], list[str]]:
    """After each try (its mount undone): nothing holds root's image, and its bytes are what they were."""
    digest = sha256(target.secret)

    def after() -> list[str]:
        problems = [f"{h} holds root's image" for h in who_holds(target.secret, target.secret_key)]
        if sha256(target.secret) != digest:
            problems.append("root's image was written")
        return problems

    return after


@dataclass(frozen=True)
class Attack:
    """One attacker's stream of tries, on files of her own (a Scene of its own), with her own client
    process, her own attacker process and a root client to examine what she got."""

    label: str
    build: Callable[[Scene, Attacker, OtherUser, Client], Race]


@dataclass(frozen=True)
class Arena:
    bus: Bus
    ids: tuple[int, int, tuple[int, ...]]
    scene: Scene

    def _one(self, attack: Attack) -> Tally:
        scene = self.scene.sub(attack.label)
        caller = OtherUser(self.bus, *self.ids)
        attacker = Attacker(as_user(*self.ids), REPO)
        try:
            with client(self.bus.address) as c:
                return attack.build(scene, attacker, caller, c).run(attack.label)
        finally:
            attacker.close()
            caller.close()

    def run(self, *attacks: Attack) -> None:
        """Run the attacks, two at a time (two cores; each stream waits on the daemon most of the time), then
        fail with every problem any of them found."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            futures = [pool.submit(self._one, a) for a in attacks]
            tallies = [f.result() for f in futures]
        for t in tallies:
            print(t.summary())  # shown with the failure; -rP shows it for a pass
        with client(self.bus.address) as c:
            left = c.manager("ListMounts").value()
        failed = [t for t in tallies if t.problems]
        assert not failed, "\n".join(line for t in failed for line in [f"{t.summary()}:", *t.report()])
        assert left == [], f"mounts left behind: {left}"


@pytest.fixture
def arena(bus: Bus, daemon: Daemon, ids: tuple[int, int, tuple[int, ...]], scene: Scene) -> Arena:
    return Arena(bus, ids, scene)


@dataclass(frozen=True)
class SwapSetup:
    target: Target
    watch: Path
    fire: list[list[Any]]
    reset: Callable[[], None]


def swap_setup(scene: Scene, attacker: Attacker, pristine: Pristine, fmt: str, variant: str) -> SwapSetup:
    """Her decoy at ``home/img`` (file variant) or ``home/sub/img`` (directory variant), and root's image at
    ``vault/img``. The swap: ``rename(home/.swap -> home/img)`` with ``.swap`` a symlink to ``vault/img``;
    or ``RENAME_EXCHANGE(home/sub, home/sub.swap)`` with ``sub.swap`` a symlink to ``vault`` (rename(2) cannot
    put a symlink over a directory; the exchange is the atomic way)."""
    src_decoy, src_secret = (pristine.decoy_raw, pristine.secret_raw) if fmt == "raw" else \
        (pristine.decoy_qcow2, pristine.secret_qcow2)
    secret = scene.root_only(_copy(src_secret, scene.vault / "img"))
    master = scene.mine(_copy(src_decoy, scene.home / ".decoy"))
    if variant == "file":
        given, watch = scene.home / "img", scene.home
        swap = scene.home / ".swap"
        attacker.do(["link", master, given], ["symlink", secret, swap])
        fire = [["rename", str(swap), str(given)]]

        def reset() -> None:
            if given.is_symlink():
                attacker.do(["link", master, f"{given}.new"], ["rename", f"{given}.new", given])
            if not swap.is_symlink():
                attacker.do(["symlink", secret, swap])
    else:
        sub, swap = scene.home / "sub", scene.home / "sub.swap"
        given, watch = sub / "img", sub
        attacker.do(["mkdir", sub], ["link", master, given], ["symlink", scene.vault, swap])
        fire = [["exchange", str(sub), str(swap)]]

        def reset() -> None:
            if sub.is_symlink():
                attacker.do(["exchange", sub, swap])
    return SwapSetup(Target(given, key_of(master), secret, key_of(secret)), watch, fire, reset)


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def swap_attack(pristine: Pristine, fmt: str, variant: str, call: str, options: dict[str, Any]) -> Attack:
    def build(scene: Scene, attacker: Attacker, caller: OtherUser, c: Client) -> Race:
        setup = swap_setup(scene, attacker, pristine, fmt, variant)

        def make() -> Any:
            given = setup.target.given
            return caller.mount(given, **options) if call == "Mount" else caller.inspect(given)

        examine = mount_examiner(c, setup.target, exact=True) if call == "Mount" else inspect_examiner(exact=True)
        return Race(attacker, setup.watch, "img", make, examine, setup.fire, setup.reset,
                    roots_image_untouched(setup.target))

    return Attack(f"{call} {fmt}, {variant} swapped", build)


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
@pytest.mark.parametrize(("fmt", "backend"), [("raw", "loop"), ("qcow2", "fuse")], ids=["raw-loop", "qcow2-fuse"])
def test_swap_after_each_open_never_mounts_roots_image(arena: Arena, pristine: Pristine, fmt: str, backend: str,
                                                       read_only: bool) -> None:
    """After the K-th open she observes, she swaps her image (one attacker) or a directory on its path (another,
    at the same time) for a symlink to root's: no mount ever shows root's image, each loop device is backed by
    her decoy's inode, nothing holds root's image open, ``Image`` names her file, every failure is a clear
    error that tells nothing of root's image, and root's image's bytes never change."""
    options = {"backend": ("s", backend), "read-only": ("b", read_only)}
    arena.run(*(swap_attack(pristine, fmt, variant, "Mount", options) for variant in ("file", "dir")))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_swap_after_each_open_never_inspects_roots_image(arena: Arena, pristine: Pristine, fmt: str) -> None:
    """The same race against Inspect: never a label, UUID, size or layout of root's image."""
    arena.run(*(swap_attack(pristine, fmt, variant, "Inspect", {}) for variant in ("file", "dir")))


# --- the header rewrite -----------------------------------------------------------------------------------


def set_qcow2_data_file(path: Path, name: str) -> None:
    """Make the qcow2 at ``path`` name ``name`` as its external data file (extension 0x44415441, incompatible
    feature bit 2), whatever it named before: a test-side header writer, so any name fits, even ones
    ``qemu-img create`` would try to open."""
    data = bytearray(path.read_bytes())
    version, backing_offset = struct.unpack_from(">IQ", data, 4)
    cluster = 1 << struct.unpack_from(">I", data, 20)[0]
    assert version == 3, "only qcow2 version 3 has header extensions with features"
    header_length = struct.unpack_from(">I", data, 100)[0]
    extensions: list[tuple[int, bytes]] = []
    pos = header_length
    while True:
        ext_type, length = struct.unpack_from(">II", data, pos)
        if ext_type == 0:
            break
        extensions.append((ext_type, bytes(data[pos + 8: pos + 8 + length])))
        pos += 8 + ((length + 7) & ~7)
    extensions = [(t, d) for t, d in extensions if t != QCOW2_EXT_DATA_FILE]
    extensions.insert(0, (QCOW2_EXT_DATA_FILE, name.encode()))
    out = b"".join(struct.pack(">II", t, len(d)) + d + b"\0" * (-len(d) % 8) for t, d in extensions)
    out += b"\0" * 8
    end = backing_offset or cluster
    assert header_length + len(out) <= end, "the new header extensions do not fit"
    data[header_length:end] = out + b"\0" * (end - header_length - len(out))
    incompatible = struct.unpack_from(">Q", data, 72)[0]
    struct.pack_into(">Q", data, 72, incompatible | 4)
    path.write_bytes(bytes(data))


def qcow2_with_data_file(path: Path, name: str, size: int, *, raw: bool = False) -> Path:
    """A qcow2 naming ``name`` as its data file (made with a placeholder data file, then renamed in the
    header). ``raw``: data_file_raw=on (guest offset = data file offset, every cluster mapped)."""
    placeholder = path.with_name(path.name + ".placeholder")
    options = f"data_file={placeholder}" + (",data_file_raw=on" if raw else "")
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), str(size)])
    placeholder.unlink()
    set_qcow2_data_file(path, name)
    return path


def vmdk_descriptor(extent: str, sectors: int) -> str:
    """A monolithicFlat VMDK descriptor with one extent."""
    cylinders = max(1, sectors // (16 * 63))
    return ("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
            'createType="monolithicFlat"\n\n# Extent description\n'
            f'RW {sectors} FLAT "{extent}" 0\n\n# The Disk Data Base\n#DDB\n\n'
            f'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "{cylinders}"\n'
            'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n')


@dataclass(frozen=True)
class Rewrite:
    given: Path
    original: Path  # her copy of the header as it was
    variant: Path  # the header naming root's file
    target: Target


def rewrite_setup(scene: Scene, pristine: Pristine, kind: str) -> Rewrite:
    secret = scene.root_only(_copy(pristine.secret_raw, scene.vault / "secret.raw"))
    if kind == "qcow2-data-file":
        given = scene.mine(_copy(pristine.decoy_qcow2, scene.home / "decoy.qcow2"))
        variant = qcow2_with_data_file(scene.home / ".variant.qcow2", str(secret), VARIANT_SIZE, raw=True)
    else:
        flat = scene.mine(_copy(pristine.decoy_raw, scene.home / "decoy-flat.vmdk"))
        given = scene.home / "decoy.vmdk"
        given.write_text(vmdk_descriptor(flat.name, DECOY_SIZE // 512))
        variant = scene.home / ".variant.vmdk"
        variant.write_text(vmdk_descriptor(str(secret), VARIANT_SIZE // 512))
    scene.mine(given)
    scene.mine(variant)
    original = scene.mine(_copy(given, scene.home / f".{given.name}.orig"))
    return Rewrite(given, original, variant, Target(given, key_of(given), secret, key_of(secret)))


def rewrite_attack(pristine: Pristine, kind: str, call: str) -> Attack:
    def build(scene: Scene, attacker: Attacker, caller: OtherUser, c: Client) -> Race:
        rw = rewrite_setup(scene, pristine, kind)

        def make() -> Any:
            return caller.mount(rw.given, backend=("s", "fuse")) if call == "Mount" else caller.inspect(rw.given)

        def reset() -> None:
            attacker.do(["overwrite", rw.given, rw.original])

        examine = mount_examiner(c, rw.target, exact=False) if call == "Mount" else inspect_examiner(exact=False)
        return Race(attacker, scene.home, rw.given.name, make, examine,
                    [["overwrite", str(rw.given), str(rw.variant)]], reset, roots_image_untouched(rw.target))

    return Attack(f"{call} of a {kind} rewritten", build)


@pytest.mark.parametrize("kind", ["qcow2-data-file", "vmdk-extent"])
def test_header_rewritten_after_each_open_serves_no_root_byte(arena: Arena, pristine: Pristine, kind: str) -> None:
    """After the K-th open she observes, she rewrites her own header in place (same inode) so that it names
    root's image as its external data file (qcow2) or its extent (VMDK); one attacker mounts, another (at the
    same time, on files of her own) inspects: no mount shows root's bytes, nothing holds root's image, no
    Inspect answer or error text tells anything of it."""
    arena.run(rewrite_attack(pristine, kind, "Mount"), rewrite_attack(pristine, kind, "Inspect"))


# --- references named in a header --------------------------------------------------------------------------


def reference_names(scene: Scene, secret: Path, fifo: Path, directory: Path, refs: Path) -> dict[str, str]:
    return {
        "absolute root-only": str(secret),
        "relative root-only": os.path.relpath(secret, refs),
        "/proc/self/cwd/x": "/proc/self/cwd/x",
        "/proc/self/fd/3": "/proc/self/fd/3",
        "/proc/self/environ": "/proc/self/environ",
        "json:": 'json:{"driver":"raw","file":{"driver":"file","filename":"' + str(secret) + '"}}',
        "nbd:": "nbd:unix:/tmp/x",
        "/dev/null": "/dev/null",
        "/dev/zero": "/dev/zero",
        "her FIFO": str(fifo),
        "her directory": str(directory),
    }


def image_naming(kind: str, path: Path, name: str) -> Path:
    if kind == "backing file":
        images.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", str(path),
                    str(DECOY_SIZE)])
    elif kind == "data file":
        qcow2_with_data_file(path, name, DECOY_SIZE)
    else:
        path.write_text(vmdk_descriptor(name, DECOY_SIZE // 512))
    return path


def daemon_internals(daemon: Daemon) -> list[tuple[str, re.Pattern[str]]]:
    """What only root (and the daemon) knows about the daemon: its pid, cwd, files, descriptors, environment."""
    pid = daemon.pid
    cwd = os.readlink(f"/proc/{pid}/cwd")
    found = [("its pid", re.compile(rf"(?<![0-9]){pid}(?![0-9])")),
             ("a socket or pipe", re.compile(r"(socket|pipe|anon_inode):\[?")),
             ("its home", re.compile(re.escape(str(daemon.home))))]
    if cwd != "/":
        found.append(("its working directory", re.compile(re.escape(cwd))))
    else:  # a name resolved against "/" as the daemon's cwd: "/x"
        found.append(("its working directory", re.compile(r"(?<![\w/.])/x(?![\w/])")))
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        text = entry.decode(errors="replace")
        if "=" in text and len(text.split("=", 1)[1]) >= 8:
            found.append((f"its environment ({text.split('=', 1)[0]})", re.compile(re.escape(text.split("=", 1)[1]))))
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("/") and not link.startswith("/dev/"):
                found.append((f"its fd {fd}", re.compile(re.escape(link))))
    return found


REFERENCE_KINDS = ["backing file", "data file", "VMDK extent"]


@pytest.mark.parametrize("kind", REFERENCE_KINDS)
def test_references_in_a_header_are_clear_errors_that_tell_nothing(c: Client, daemon: Daemon, caller: OtherUser,
                                                                   attacker: Attacker, scene: Scene,
                                                                   pristine: Pristine, kind: str) -> None:
    """Each reference she may write into her header: one clear error (InvalidImage, NotAuthorized or
    NotFound) for Mount and for Inspect, whose text holds nothing of root's image and nothing of the daemon
    (pid, working directory, descriptors, environment, files); and the daemon keeps serving."""
    secret = scene.root_only(_copy(pristine.secret_raw, scene.vault / "secret.raw"))
    refs = scene.home / "refs"
    fifo, directory = refs / "fifo", refs / "adir"
    attacker.do(["mkdir", refs], ["mkfifo", fifo], ["mkdir", directory])
    internals = daemon_internals(daemon)
    suffix = ".vmdk" if kind == "VMDK extent" else ".qcow2"
    problems = []
    for i, (what, name) in enumerate(reference_names(scene, secret, fifo, directory, refs).items()):
        image = scene.mine(image_naming(kind, refs / f"top{i}{suffix}", name))
        for call in ("Mount", "Inspect"):
            started = time.monotonic()
            reply = caller.mount(image) if call == "Mount" else caller.inspect(image)
            took = time.monotonic() - started
            label = f"{call} with {kind} {what} ({name[:60]})"
            if reply.error is None:
                problems.append(f"{label}: succeeded: {reply.body}")
                if call == "Mount":
                    c.call(reply.body[0], MOUNT_IFACE, "Unmount", "a{sv}", [{}])
                continue
            problems += [f"{label}: {p}" for p in
                         error_problems(reply, ("InvalidImage", "NotAuthorized", "NotFound"))]
            text = reply.text.replace(name, "<name>").replace(str(image), "<image>")
            if told := [fact for fact, pattern in internals if pattern.search(text)]:
                problems.append(f"{label}: the error text tells {', '.join(told)}: {reply.text}")
            if took > 10:
                problems.append(f"{label}: took {took:.1f} s")
        problems += [f"{what}: {h} holds root's image" for h in who_holds(secret, key_of(secret))]
    assert c.manager("ListMounts").value() == []
    ok = scene.mine(_copy(pristine.decoy_raw, scene.home / "fine.raw"))
    assert caller.inspect(ok).error is None, "the daemon no longer serves her"
    assert not problems, f"{len(problems)} problems:\n  " + "\n  ".join(problems)


# --- no existence oracle ----------------------------------------------------------------------------------


def test_names_in_a_directory_she_cannot_search_all_look_alike(c: Client, caller: OtherUser, scene: Scene,
                                                               pristine: Pristine) -> None:
    """An image, or a backing file, in root's 0700 directory: whether it exists or not, she gets the same
    error name and text (her own names aside): nothing resolved as root answers her first."""
    scene.root_only(_copy(pristine.secret_raw, scene.vault / "there.raw"))
    there, missing = scene.vault / "there.raw", scene.vault / "missing.raw"
    answers = {}
    for name in (there, missing):
        top = scene.mine(image_naming("backing file", scene.home / f"over-{name.stem}.qcow2", str(name)))
        for call, image in (("Mount", name), ("Inspect", name), ("Mount", top), ("Inspect", top)):
            reply = caller.mount(image) if call == "Mount" else caller.inspect(image)
            assert reply.error is not None, f"{call} of {image} succeeded"
            text = reply.text.replace(str(name), "<name>").replace(str(top), "<image>")
            text = text.replace(name.name, "<name>").replace(top.name, "<image>")
            answers[(name, call, image == top)] = (reply.error, text)
    differ = []
    for call in ("Mount", "Inspect"):
        for through_header in (False, True):
            a, b = answers[(there, call, through_header)], answers[(missing, call, through_header)]
            how = "as a backing file" if through_header else "as the image"
            if a != b:
                differ.append(f"{call} {how}: an existing name answers {a}, a missing one {b}")
    assert c.manager("ListMounts").value() == []
    assert not differ, "\n  ".join(["whether a name in root's directory exists shows:", *differ])
