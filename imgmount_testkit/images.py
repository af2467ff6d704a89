"""Build test images from specs at test time: sfdisk scripts, mkfs, LVM tools, ``qemu-img convert``.

Nothing here is mocked: every image is made by the same tools a person would use. Filesystems and LVM are
created through loop devices at byte offsets, so this works on hosts without kernel partition parsing or
device-mapper (LVM runs with ``--driverloaded n``: metadata only, no activation).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
LVM_ENV = {"DM_DISABLE_UDEV": "1", "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}


def run(argv: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None) -> str:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, env=full_env, check=False,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def partition(path: Path, script: str, *, sector_size: int = 512) -> None:
    """Write a partition table with ``sfdisk`` from a script (``label: gpt`` / ``label: dos`` ...).

    sfdisk treats a regular file as 512-byte sectors; other sizes go through a loop device of that sector
    size.
    """
    with _as_device(path, sector_size) as dev:
        run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "--wipe", "never", dev], stdin=script)


def sfdisk_json(path: Path, *, sector_size: int = 512) -> dict[str, Any]:
    with _as_device(path, sector_size) as dev:
        out = run(["sfdisk", "--json", dev])
    table: dict[str, Any] = json.loads(out)["partitiontable"]
    return table


@contextlib.contextmanager
def _as_device(path: Path, sector_size: int) -> Iterator[str]:
    if sector_size == 512:
        yield str(path)
    else:
        with loop(path, sector_size=sector_size) as dev:
            yield dev


@contextlib.contextmanager
def loop(path: Path, offset: int = 0, size: int | None = None, *, read_only: bool = False,
         sector_size: int = 512) -> Iterator[str]:
    argv = ["losetup", "--find", "--show", "--offset", str(offset), "--sector-size", str(sector_size)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    dev = run([*argv, str(path)]).strip()
    try:
        yield dev
    finally:
        run(["losetup", "--detach", dev])


@contextlib.contextmanager
def mounted(dev: str, *, read_only: bool = False) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="imgmount-test-") as mnt:
        run(["mount", "-o", "ro" if read_only else "rw", dev, mnt])
        try:
            yield Path(mnt)
        finally:
            run(["umount", mnt])


MKFS = {
    "ext2": ["mkfs.ext2", "-q", "-F"],
    "ext3": ["mkfs.ext3", "-q", "-F"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "vfat": ["mkfs.vfat"],
    "swap": ["mkswap"],
}
LABEL_FLAG = {"vfat": "-n"}


def mkfs(dev: str, fstype: str, label: str = "", uuid: str = "") -> None:
    argv = list(MKFS[fstype])
    if label:
        argv += [LABEL_FLAG.get(fstype, "-L"), label]
    if uuid and fstype in ("ext2", "ext3", "ext4", "btrfs", "swap"):
        argv += ["-U", uuid]
    elif uuid and fstype == "xfs":
        argv += ["-m", f"uuid={uuid}"]
    # xfsprogs 6 refuses filesystems under 300 MB unless run as part of a test suite, which this is.
    run([*argv, dev], env={"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"})


def format_region(image: Path, offset: int, size: int, fstype: str, *, label: str = "",
                  uuid: str = "", files: Mapping[str, bytes] | None = None, sector_size: int = 512) -> None:
    """Make a filesystem in ``[offset, offset+size)`` of a raw image and put ``files`` in it."""
    with loop(image, offset, size, sector_size=sector_size) as dev:
        mkfs(dev, fstype, label, uuid)
        if files:
            with mounted(dev) as mnt:
                for name, data in files.items():
                    target = mnt / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)


def convert(src: Path, dst: Path, fmt: str, *options: str) -> Path:
    """``qemu-img convert`` a raw image to ``fmt`` (with ``-o`` options such as ``subformat=...``)."""
    argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
    if options:
        argv += ["-o", ",".join(options)]
    run([*argv, str(src), str(dst)])
    return dst


@dataclass(frozen=True)
class LvSpec:
    name: str
    size_mib: int
    fstype: str = ""
    label: str = ""
    files: Mapping[str, bytes] | None = None


@dataclass(frozen=True)
class LvExtent:
    name: str
    uuid: str
    offset: int  # byte offset of the LV's first extent within the PV region
    size: int


def lvm_args(dev: str) -> list[str]:
    """Only ever look at ``dev``; no device-mapper; and no metadata backups left in the host's /etc/lvm."""
    return ["--devices", dev, "--driverloaded", "n", "--config", "backup { backup = 0 archive = 0 }"]


def make_lvm(image: Path, offset: int, size: int, vg: str, lvs: Sequence[LvSpec], *,
             vg_uuid_from: Path | None = None) -> list[LvExtent]:
    """Create a PV in ``[offset, offset+size)``, a VG ``vg`` and linear LVs, and format each LV.

    Works without device-mapper: LVM writes metadata only, and each LV's filesystem is made through a loop
    device at the extent the LVM tools report (not at what our own parser says: the tests compare the two).
    """
    with loop(image, offset, size) as dev:
        lvm = lvm_args(dev)
        run(["pvcreate", "-q", *lvm, dev], env=LVM_ENV)
        run(["vgcreate", "-q", *lvm, vg, dev], env=LVM_ENV)
        for lv in lvs:
            run(["lvcreate", "-q", *lvm, "-an", "-Zn", "-L", f"{lv.size_mib}m", "-n", lv.name, vg],
                env=LVM_ENV)
        extents = lv_extents(dev)
        _undo_auto_activation(dev, vg)
    for lv in lvs:
        ext = extents[lv.name]
        if lv.fstype:
            format_region(image, offset + ext.offset, ext.size, lv.fstype, label=lv.label, files=lv.files)
    return [extents[lv.name] for lv in lvs]


def _undo_auto_activation(dev: str, vg: str) -> None:
    """Where a udevd runs (the VM lane), Debian's LVM rules auto-activate the new VG on our loop device, as
    they would on any host: wait for udev to finish, then deactivate it, so the loop device can go."""
    if shutil.which("udevadm") is None:
        return
    if subprocess.run(["udevadm", "control", "--ping"], capture_output=True, check=False).returncode != 0:
        return
    run(["udevadm", "settle", "--timeout=60"])
    run(["vgchange", "-q", "-an", "--devices", dev, vg], env=LVM_ENV)
    forget_vg_online(vg)


def forget_vg_online(vg: str) -> None:
    """Make LVM's event activation treat ``vg`` as never seen, as on a host that just booted.

    pvscan records each PV it saw in /run/lvm/pvs_online/<pvid> (never removed: Debian's rule skips remove
    events) and each VG it activated in /run/lvm/vgs_online/<vg>. A PV already recorded on another device
    (our build loop device, long gone) is not counted again, so the VG never looks complete and is never
    activated: forget both.
    """
    run_lvm = Path("/run/lvm")
    with contextlib.suppress(FileNotFoundError):
        (run_lvm / "vgs_online" / vg).unlink()
    for record in (run_lvm / "pvs_online").glob("*"):
        if f"vg:{vg}" in record.read_text().splitlines():
            record.unlink(missing_ok=True)


def lv_extents(dev: str) -> dict[str, LvExtent]:
    """What the LVM tools say about each LV's place on the PV ``dev`` (single linear segment LVs)."""
    lvm = lvm_args(dev)
    pe_start = int(run(["pvs", *lvm, "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", dev],
                       env=LVM_ENV).strip())
    report = json.loads(run(["lvs", *lvm, "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                             "lv_name,lv_uuid,vg_extent_size,seg_pe_ranges,lv_size"], env=LVM_ENV))
    result = {}
    for row in report["report"][0]["lv"]:
        first = int(row["seg_pe_ranges"].rsplit(":", 1)[1].split("-")[0])
        extent = int(row["vg_extent_size"])
        result[row["lv_name"]] = LvExtent(row["lv_name"], row["lv_uuid"], pe_start + first * extent,
                                          int(row["lv_size"]))
    return result


@contextlib.contextmanager
def fuse_export(image: Path, fmt: str) -> Iterator[Path]:
    """``image`` as a writable raw file, as a person reaches a disk image too large for a raw file here (ext4
    caps files at 16 TiB): a ``qemu-storage-daemon`` FUSE export, stopped again (which flushes) on leaving."""
    with tempfile.TemporaryDirectory(prefix="imgmount-export-") as tmp:
        export, pidfile = Path(tmp) / "disk.raw", Path(tmp) / "qsd.pid"
        export.touch()
        run(["qemu-storage-daemon", "--daemonize", "--pidfile", str(pidfile),
             "--blockdev", f"driver={fmt},node-name=disk,file.driver=file,file.filename={image}",
             "--export", f"type=fuse,id=export,node-name=disk,mountpoint={export},writable=on"])
        pidfd = os.pidfd_open(int(pidfile.read_text()))
        try:
            yield export
        finally:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            select.select([pidfd], [], [], 60)  # readable once the daemon has exited
            os.close(pidfd)


def crash_after_writing(image: Path, fmt: str, files: Mapping[str, bytes], *, offset: int = 0,
                        size: int | None = None) -> None:
    """Leave ``image`` as a crash leaves it: the filesystem at ``offset`` is mounted read-write through a
    ``qemu-storage-daemon`` FUSE export and a loop device, each of ``files`` is written and fsynced (the
    guest was told it is safe), then the server is killed with SIGKILL under the mount. What the writes
    changed in the filesystem's metadata is then only in its journal or log.

    The server is our child, not a daemon: we kill it, and reap it."""
    with tempfile.TemporaryDirectory(prefix="imgmount-crash-") as tmp:
        export = Path(tmp) / "disk.raw"
        export.touch()
        server = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver={fmt},node-name=disk,file.driver=file,file.filename={image}",
             "--export", f"type=fuse,id=export,node-name=disk,mountpoint={export},writable=on"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_served(export, server)
            _write_and_kill(export, server, files, offset, size)
        finally:
            server.kill()
            server.wait()
            subprocess.run(["umount", "--lazy", str(export)], capture_output=True, check=False)


def _wait_served(export: Path, server: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until the export is mounted (the empty file we made turns into the disk), or the server exits."""
    deadline = time.monotonic() + timeout
    while export.stat().st_size == 0:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"qemu-storage-daemon did not export {export} (exit status {server.poll()})")
        time.sleep(0.02)


def _write_and_kill(export: Path, server: subprocess.Popen[bytes], files: Mapping[str, bytes], offset: int,
                    size: int | None) -> None:
    limit = ["--sizelimit", str(size)] if size is not None else []
    dev = run(["losetup", "--find", "--show", "--offset", str(offset), *limit, str(export)]).strip()
    mnt = tempfile.mkdtemp(prefix="imgmount-crash-mnt-")
    try:
        run(["mount", dev, mnt])
        for name, data in files.items():
            with open(os.path.join(mnt, name), "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        server.kill()
        server.wait()
    finally:
        if subprocess.run(["umount", mnt], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", mnt], capture_output=True, check=False)
        run(["losetup", "--detach", dev])
        os.rmdir(mnt)
