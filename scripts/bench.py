"""Benchmarks for imgmount (issue 3): run by scripts/bench on the host and inside the VM lane.

Every figure is a median of several runs measured side by side in one process, so ratios are comparable run
to run; nothing here is asserted. Caches are dropped before each cold read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_crafted import crafted_info, print_daemon_memory  # scripts/, beside this file
from bench_crypt import luks_rows, print_rows
from bench_ntfs import rows as ntfs_rows
from dbus_fast import Variant

from imgmount_testkit import images
from imgmount_testkit.bus import Bus, private_bus
from imgmount_testkit.client import call_message, client, reply_of
from imgmount_testkit.daemon import Daemon, tmpfs
from imgmount_testkit.users import OtherUser, imgmount_group
from mountd.engine.engine import Engine
from mountd.model import MountRequest
from mountd.service.dbusapi import MANAGER_IFACE, MANAGER_PATH, MOUNT_IFACE
from mountd.settings import Settings

MiB = images.MiB
BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # measure as installed
ENV.update({"DM_DISABLE_UDEV": "1", "LVM_SUPPRESS_FD_WARNINGS": "1"})


WORK_DIR = os.environ.get("IMGMOUNT_VM_WORK") or os.environ.get("TMPDIR")  # the VM lane's shared dir


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """Where the images live: in the VM lane the guest-local disk (scripts/vm-run --disk), so cold reads
    measure the backends and not the lane's 9p share of the host's files; else a temporary directory."""
    disk = os.environ.get("IMGMOUNT_VM_DISK")
    if not disk:
        with tempfile.TemporaryDirectory(prefix="imgmount-bench-", dir=WORK_DIR) as tmp:
            yield Path(tmp)
        return
    mnt = Path("/run/bench-disk")
    mnt.mkdir(exist_ok=True)
    sh(f"mkfs.ext4 -q -F {disk} && mount {disk} {mnt}")
    try:
        yield mnt
    finally:
        sh(f"umount {mnt}")


def sh(script: str) -> None:
    subprocess.run(["bash", "-euc", script], check=True, capture_output=True, env=ENV)


def timed(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cold_read(read: Callable[[], object]) -> float:
    drop_caches()
    return timed(read, 1)


def imgmount(*args: str, env: dict[str, str] = ENV) -> str:
    argv = [str(BIN / "imgmount"), *args, "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"imgmount {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def imgumount(target: str, env: dict[str, str] = ENV) -> None:
    subprocess.run([str(BIN / "imgumount"), target], check=True, capture_output=True, env=env)


@contextlib.contextmanager
def daemon_for_commands() -> Iterator[dict[str, str]]:
    """A real imgmountd on a private system bus; yields the environment in which the commands use it, as
    they do on an installed host (without it, and as root, they run the engine in-process)."""
    with private_bus() as bus, tmpfs() as run:
        daemon = Daemon(bus, run).start()
        try:
            yield commands_env(bus)
        finally:
            close_quietly(daemon)


def commands_env(bus: Bus) -> dict[str, str]:
    """Where the commands call the daemon on ``bus`` (a state dir would make them run in-process)."""
    env = {**ENV, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
    env.pop("IMGMOUNT_STATE_DIR", None)
    return env


def close_quietly(daemon: Daemon) -> None:
    """Stop the daemon without printing its log (the test helper prints it for pytest)."""
    daemon.close(quiet=True)


# --- images ---------------------------------------------------------------------------------------------


def build(work: Path) -> dict[str, Path]:
    ext4 = images.blank(work / "ext4.raw", 384 * MiB)
    images.partition(ext4, "label: gpt\nsize=320MiB\n")
    p1 = images.sfdisk_json(ext4)["partitions"][0]
    images.format_region(
        ext4, p1["start"] * 512, p1["size"] * 512, "ext4", files={"big.bin": os.urandom(256 * MiB)}
    )
    lvm = images.blank(work / "lvm.raw", 128 * MiB)
    images.partition(lvm, "label: gpt\ntype=E6D6D379-F507-44C2-A23C-238F2A3DF928\n")
    p = images.sfdisk_json(lvm)["partitions"][0]
    (lv,) = images.make_lvm(
        lvm, p["start"] * 512, p["size"] * 512, "benchvg", [images.LvSpec("data", 64, "ext4")]
    )
    small = images.blank(work / "small.raw", 32 * MiB)
    images.format_region(small, 0, 32 * MiB, "ext4", files={"f": b"x"})
    found = {
        "ext4.raw": ext4,
        "ext4.qcow2": images.convert(ext4, work / "ext4.qcow2", "qcow2"),
        "lvm.qcow2": images.convert(lvm, work / "lvm.qcow2", "qcow2"),
    }
    found.update(
        {f"small{i}.qcow2": images.convert(small, work / f"small{i}.qcow2", "qcow2") for i in range(16)}
    )
    (work / "offsets.json").write_text(
        json.dumps({"p1": p1["start"] * 512, "lv": p["start"] * 512 + lv.offset, "lv_size": lv.size})
    )
    return found


# --- the bare commands a person types -------------------------------------------------------------------


def bare_nbd(image: Path, mnt: Path, lvm: bool) -> None:
    dev = next(f"/dev/{d.name}" for d in sorted(Path("/sys/block").glob("nbd*")) if not (d / "pid").exists())
    if lvm:
        sh(
            f"qemu-nbd --fork -r -f qcow2 -c {dev} {image}; partprobe {dev};"
            f" vgscan --devices {dev}p1 >/dev/null;"
            f" vgchange -ay --devices {dev}p1 benchvg >/dev/null; mount -o ro /dev/benchvg/data {mnt};"
            f" umount {mnt}; vgchange -an --devices {dev}p1 benchvg >/dev/null; qemu-nbd -d {dev} >/dev/null"
        )
    else:
        sh(
            f"qemu-nbd --fork -r -f qcow2 -c {dev} {image}; partprobe {dev}; mount -o ro {dev}p1 {mnt};"
            f" umount {mnt}; qemu-nbd -d {dev} >/dev/null"
        )


def bare_fuse(image: Path, mnt: Path, offset: int, size: int) -> None:
    export = mnt.parent / "export.raw"
    sh(
        f"touch {export}; qemu-storage-daemon --daemonize --pidfile {export}.pid --blockdev "
        f"driver=qcow2,node-name=q,file.driver=file,file.filename={image} --export "
        f"type=fuse,id=e,node-name=q,mountpoint={export},writable=off;"
        f" dev=$(losetup -f --show -r -o {offset} --sizelimit {size} {export}); mount -o ro $dev {mnt};"
        f" umount {mnt}; losetup -d $dev; pid=$(cat {export}.pid); kill $pid;"
        f" while kill -0 $pid 2>/dev/null && ! grep -q zombie /proc/$pid/status 2>/dev/null; do :; done;"
        f" umount -l {export} 2>/dev/null || true; rm -f {export} {export}.pid"
    )


# --- measurements ---------------------------------------------------------------------------------------


def latency(
    found: dict[str, Path], work: Path, where: str, repeats: int, daemon_env: dict[str, str]
) -> list[tuple[str, float, float, float, float]]:
    offsets = json.loads((work / "offsets.json").read_text())
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    rows = []
    for name, key, volume, lvm in (
        ("qcow2 GPT ext4", "ext4.qcow2", "p1", False),
        ("qcow2 LVM ext4", "lvm.qcow2", "benchvg/data", True),
    ):
        image = found[key]

        def commands(image: Path = image, volume: str = volume, env: dict[str, str] = ENV) -> None:
            imgmount(str(image), "--volume", volume, "--mount-root", str(work / "media"), env=env)
            imgumount(str(image), env=env)

        def via_daemon(image: Path = image, volume: str = volume) -> None:
            commands(image, volume, daemon_env)

        def engine(image: Path = image, volume: str = volume) -> None:
            eng = Engine.started(Settings.from_environment())
            info = eng.mount(MountRequest(str(image), volumes=(volume,), mount_root=str(work / "media")))
            eng.unmount(info.id)

        off, size = (offsets["lv"], offsets["lv_size"]) if lvm else (offsets["p1"], 320 * MiB)

        def bare(image: Path = image, lvm: bool = lvm, off: int = off, size: int = size) -> None:
            if where == "vm":
                bare_nbd(image, mnt, lvm)
            else:
                bare_fuse(image, mnt, off, size)

        rows.append((name, timed(via_daemon, repeats), timed(commands, repeats), timed(engine, repeats),
                     timed(bare, repeats)))
    return rows


def callers(found: dict[str, Path], work: Path, repeats: int) -> list[tuple[str, float, float]]:
    """Mount+unmount of volume p1 through one imgmountd by root (a dbus-fast client; root's image file, 0644)
    and by a member of group imgmount (account ``daemon``; a copy of the same bytes that is hers, 0600, which
    the daemon opens as her and, unless raw, has a qemu-storage-daemon of hers parse): the two alternated,
    medians of ``repeats``. Her mounts go under /run/media/daemon (only root chooses the mount root)."""
    account = pwd.getpwnam("daemon")
    shared, pairs = caller_images(found, work, account.pw_uid, account.pw_gid)
    media = Path("/run/media")
    had = {d for d in (media, media / account.pw_name) if d.is_dir()}
    rows = []
    try:
        with private_bus() as bus, tmpfs() as run, imgmount_group() as gid, contextlib.ExitStack() as stack:
            daemon = Daemon(bus, run)
            stack.callback(close_quietly, daemon)  # SIGTERM: unmounts whatever a failure left
            daemon.start()
            c = stack.enter_context(client(bus.address))
            user = OtherUser(bus, account.pw_uid, account.pw_gid, (gid,))
            stack.callback(user.close)
            p1 = ("as", ["p1"])
            seen: set[str] = set()  # the backends used

            def cycle(mount: Callable[[], str], unmount: Callable[[str], object]) -> float:
                start = time.perf_counter()
                path = mount()
                took = time.perf_counter() - start
                seen.add(c.prop(path, MOUNT_IFACE, "Backend"))  # not timed
                start = time.perf_counter()
                unmount(path)
                return took + time.perf_counter() - start

            for key, ours, hers in pairs:
                seen.clear()

                def by_root(image: Path = ours) -> float:
                    return cycle(lambda: c.mount(image, volumes=Variant(*p1), **{
                        "mount-root": Variant("s", str(work / "media"))}).value(),
                        lambda path: c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value())

                def by_user(image: Path = hers) -> float:
                    return cycle(lambda: user.mount(image, volumes=p1).value(),
                                 lambda path: user.unmount(path).value())

                times: dict[Callable[[], float], list[float]] = {by_root: [], by_user: []}
                for i in range(repeats):  # alternated, each going first every other time
                    for who in (by_root, by_user)[:: 1 if i % 2 == 0 else -1]:
                        times[who].append(who())
                rows.append((f"{key.split('.')[1]} p1 ({'/'.join(sorted(seen))})",
                             statistics.median(times[by_root]), statistics.median(times[by_user])))
    finally:
        for made in (media / account.pw_name, media):  # the engine leaves mount roots in place, like udisks
            if made not in had:
                with contextlib.suppress(OSError):
                    made.rmdir()
        shutil.rmtree(shared)
    return rows


def caller_images(
    found: dict[str, Path], work: Path, uid: int, gid: int
) -> tuple[Path, list[tuple[str, Path, Path]]]:
    """The raw and the qcow2 GPT ext4 images twice in a directory every uid may enter: root's (a hard link
    to the built one, 0644) and a copy of uid's (0600). On the disk of the other images: bus.world_dir's
    directory is, in the VM lane, a tmpfs in the guest's memory."""
    work.chmod(0o711)  # searchable, so she reaches her file in shared
    shared = Path(tempfile.mkdtemp(prefix="callers-", dir=work))
    shared.chmod(0o755)
    pairs = []
    for key in ("ext4.raw", "ext4.qcow2"):
        ours, hers = shared / f"root-{key}", shared / f"user-{key}"
        os.link(found[key], ours)
        ours.chmod(0o644)
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(found[key]), str(hers)], check=True)
        os.chown(hers, uid, gid)
        hers.chmod(0o600)
        pairs.append((key, ours, hers))
    return shared, pairs


def throughput(
    found: dict[str, Path], work: Path, where: str, repeats: int
) -> list[tuple[str, float, float]]:
    """Cold reads of the 256 MiB file through each backend, each alternated with a cold read of the same
    bytes from the raw image file (so both see the same disk and cache weather): medians of ``repeats``."""
    offsets = json.loads((work / "offsets.json").read_text())
    raw = found["ext4.raw"]

    def direct() -> None:
        with open(raw, "rb", buffering=0) as f:
            f.seek(offsets["p1"])
            for _ in range(256):
                f.read(MiB)

    rows = []
    backends = [("loop", "ext4.raw"), ("fuse", "ext4.qcow2")] + (
        [("nbd", "ext4.qcow2")] if where == "vm" else []
    )
    for backend, key in backends:
        info = json.loads(
            imgmount(str(found[key]), "--backend", backend, "--mount-root", str(work / "media"))
        )
        big = Path(info["volumes"][0]["mountpoint"]) / "big.bin"
        pairs = [(cold_read(direct), cold_read(big.read_bytes)) for _ in range(repeats)]
        imgumount(str(found[key]))
        direct_s = statistics.median(d for d, _ in pairs)
        ours_s = statistics.median(o for _, o in pairs)
        rows.append((f"{backend} ({key})", 256 / ours_s, 256 / direct_s))
    return rows


def concurrency(found: dict[str, Path], work: Path) -> list[tuple[int, float]]:
    rows = []
    for n in (1, 4, 16):
        targets = [found[f"small{i}.qcow2"] for i in range(n)]
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [str(BIN / "imgmount"), str(t), "--mount-root", str(work / "media")],
                stdout=subprocess.DEVNULL,
                env=ENV,
            )
            for t in targets
        ]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("a concurrent mount failed")
        rows.append((n, (time.perf_counter() - start) / n))
        subprocess.run([str(BIN / "imgumount"), "--all"], check=True, capture_output=True, env=ENV)
    return rows


def daemon_concurrency(found: dict[str, Path], work: Path, repeats: int) -> list[tuple[int, float]]:
    """N Mount calls of N qcow2 images at once through one imgmountd (FUSE backend), then N Unmounts at
    once: seconds per image, median of ``repeats``. Flat from 1 to 16 means no lock serialises them."""
    rows = []
    with private_bus() as bus, tmpfs() as run, client(bus.address) as c:
        daemon = Daemon(bus, run).start()
        media = Variant("s", str(work / "media"))
        options = {"mount-root": media, "backend": Variant("s", "fuse")}

        async def at_once(messages: list[Any]) -> list[Any]:
            return list(await asyncio.gather(*(c.bus.call(m) for m in messages)))

        def all_at_once(n: int) -> None:
            calls = [call_message(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}",
                                  [str(found[f"small{i}.qcow2"]), options]) for i in range(n)]
            paths = [reply_of(r).value() for r in c.run(at_once(calls))]
            calls = [call_message(p, MOUNT_IFACE, "Unmount", "a{sv}", [{}]) for p in paths]
            assert all(reply_of(r).error is None for r in c.run(at_once(calls)))

        try:
            for n in (1, 4, 16):
                rows.append((n, timed(lambda n=n: all_at_once(n), repeats) / n))  # type: ignore[misc]
        finally:
            close_quietly(daemon)
    return rows


def startup(env: dict[str, str], runs: int = 40) -> tuple[float, float]:
    """``imgmount --list`` through the daemon and a bare ``python -c pass`` of the same interpreter, run in
    turn ``runs`` times (so both see the same load): their median wall times. Issue 11 aims at 2x."""
    def wall(argv: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        return time.perf_counter() - start

    command, bare = [], []
    for _ in range(runs):
        bare.append(wall([sys.executable, "-c", "pass"]))
        command.append(wall([str(BIN / "imgmount"), "--list"]))
    return statistics.median(command), statistics.median(bare)


def daemon_costs(found: dict[str, Path], work: Path, repeats: int) -> list[tuple[str, str]]:
    """What imgmountd adds: a D-Bus round trip per call, its start-up and its memory."""
    rows = []
    small = work / "small.raw"
    copies = [work / f"s{i}.raw" for i in range(64)]
    for copy in copies:
        subprocess.run(["cp", "--sparse=always", str(small), str(copy)], check=True)
    with private_bus() as bus, tmpfs() as run, client(bus.address) as c:
        daemon = Daemon(bus, run)
        start = time.perf_counter()
        daemon.start()
        rows.append(("daemon start-up, 0 mounts", f"{time.perf_counter() - start:.3f} s"))
        rows.append(("daemon memory (RSS), 0 mounts", f"{_rss(daemon.pid)} KiB"))
        media = Variant("s", str(work / "media"))

        def over_dbus() -> None:
            path = c.mount(found["ext4.raw"], volumes=Variant("as", ["p1"]), **{"mount-root": media}).value()
            assert c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).error is None

        def in_process() -> None:
            eng = Engine.started(Settings.from_environment())
            info = eng.mount(
                MountRequest(str(found["ext4.raw"]), volumes=("p1",), mount_root=str(work / "media"))
            )
            eng.unmount(info.id)

        command, bare = startup(commands_env(bus))
        rows.append(("imgmount --list, 0 mounts / python -c pass",
                     f"{command * 1000:.1f} / {bare * 1000:.1f} ms ({command / bare:.2f}x)"))
        rows.append(("mount+unmount over D-Bus (raw, loop)", f"{timed(over_dbus, repeats):.3f} s"))
        rows.append(("mount+unmount in-process (same)", f"{timed(in_process, repeats):.3f} s"))
        for image in copies:
            c.mount(image, **{"mount-root": media}).value()
        env = commands_env(bus)
        listing = timed(
            lambda: subprocess.run(
                [str(BIN / "imgmount"), "--list"], env=env, check=True, capture_output=True
            ),
            repeats,
        )
        rows.append(("imgmount --list, 64 mounts", f"{listing:.3f} s"))
        rows.append(("daemon memory (RSS), 64 mounts", f"{_rss(daemon.pid)} KiB"))
        daemon.signal(signal.SIGKILL)  # the mounts stay; a new daemon adopts them
        again = Daemon(bus, run)
        again.home, again.state, again.logfile = daemon.home, daemon.state, daemon.logfile
        start = time.perf_counter()
        again.start()
        rows.append(("daemon start-up adopting 64 mounts", f"{time.perf_counter() - start:.3f} s"))
        rows.append(("daemon memory (RSS) after adopting 64", f"{_rss(again.pid)} KiB"))
        assert len(c.manager("ListMounts").value()) == 64
        close_quietly(again)  # SIGTERM: unmounts all 64
    return rows


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--where", choices=("host", "vm"), required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["IMGMOUNT_STATE_DIR"] = ENV["IMGMOUNT_STATE_DIR"] = tempfile.mkdtemp(prefix="imgmount-bench-")
    with work_dir() as work:
        found = build(work)
        bare = (
            "qemu-nbd/partprobe/vgchange/mount" if args.where == "vm" else "qemu-storage-daemon/losetup/mount"
        )
        print(f"\n## {args.where}: mount+unmount latency, median of {args.repeats}")
        print("(commands = imgmount + imgumount through a running imgmountd, as installed; in-process = the")
        print(f"same commands without a daemon; engine = the engine called in this process; bare = {bare})")
        print(f"{'image':<16} {'commands':>9} {'in-proc':>9} {'engine':>9} {'bare':>9}   ratios to bare")
        with daemon_for_commands() as daemon_env:
            rows = latency(found, work, args.where, args.repeats, daemon_env)
        for name, via_daemon, commands, eng, bare_s in rows:
            ratios = " / ".join(f"{t / bare_s:.2f}" for t in (via_daemon, commands, eng))
            print(f"{name:<16} {via_daemon:8.3f}s {commands:8.3f}s {eng:8.3f}s {bare_s:8.3f}s   {ratios}")
        print(f"\n## {args.where}: root vs a non-root caller: mount+unmount through imgmountd, "
              f"median of {args.repeats}")
        print("(the same bytes, alternated: root's file, by root's D-Bus client; a 0600 copy of a member of")
        print("group imgmount, which the daemon opens as her and, unless raw, has a QEMU of hers parse)")
        print(f"{'image':<16} {'root':>9} {'non-root':>9} {'ratio':>6}")
        for name, root_s, user_s in callers(found, work, args.repeats):
            print(f"{name:<16} {root_s:8.3f}s {user_s:8.3f}s {user_s / root_s:6.2f}")
        print(f"\n## {args.where}: cold-cache read of a 256 MiB file, median of {args.repeats}")
        print("(direct = the same bytes read from the raw image file, alternated with each read)")
        print(f"{'backend':<22} {'MiB/s':>8} {'direct':>8} {'ratio':>6}")
        for name, mbs, direct in throughput(found, work, args.where, args.repeats):
            print(f"{name:<22} {mbs:8.0f} {direct:8.0f} {mbs / direct:6.2f}")
        print(f"\n## {args.where}: N images mounted at once by N imgmount processes")
        print(f"{'N':>3} {'seconds per image':>18}")
        for n, per in concurrency(found, work):
            print(f"{n:>3} {per:17.3f}s")
        if args.where == "vm":
            print_rows(luks_rows(work, args.repeats), args.repeats)
        if args.where == "host":
            print(f"\n## host: N qcow2 images mounted and unmounted at once through imgmountd (fuse), "
                  f"median of {args.repeats}")
            print(f"{'N':>3} {'seconds per image':>18} {'ratio to N=1':>13}")
            per_n = daemon_concurrency(found, work, args.repeats)
            for n, per in per_n:
                print(f"{n:>3} {per:17.3f}s {per / per_n[0][1]:13.2f}")
            print(f"\n## host: cold-cache read of a 256 MiB file through ntfs-3g, median of {args.repeats}")
            print("(ext4 = the same bytes on an ext4 volume of the same image, alternated with each read)")
            print(f"{'driver':<22} {'MiB/s':>8} {'ext4':>8} {'ratio':>6}")
            for name, mbs, ext4 in ntfs_rows(work, args.repeats, imgmount, imgumount, cold_read):
                print(f"{name:<22} {mbs:8.0f} {ext4:8.0f} {mbs / ext4:6.2f}")
            print("\n## host: --info of crafted inputs at each bound (time, peak RSS)")
            for name, seconds, peak in crafted_info():
                print(f"{name:<48} {seconds:7.3f}s {peak // 1024:7d} MiB")
            print_daemon_memory()
            print("\n## host: the daemon")
            for what, value in daemon_costs(found, work, args.repeats):
                print(f"{what:<40} {value:>12}")


if __name__ == "__main__":
    main()
