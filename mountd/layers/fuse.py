"""A ``qemu-storage-daemon`` FUSE export: any QEMU image format seen as a raw file, for hosts without nbd.

The daemon is started with ``--daemonize``: it forks into its own session and the command returns only once
every block node is open and the export is mounted (QEMU notifies the parent after the pidfile is written).
It outlives us by design (design: "Daemon life cycle"): a crash of the engine loses no mount, and any process
rebuilds this layer from its record, which names the daemon by pid *and* start time.

Stopping it: SIGTERM, through a pidfd. QEMU handles SIGTERM exactly as the QMP ``quit`` command (both only set
the main loop's exit flag); on leaving the loop the daemon closes its exports and then every block node
(``bdrv_close_all``, QEMU 6.0+), which flushes them. A QMP monitor would add a socket to create, protect and
clean up for no gain; the pidfd makes the signal immune to pid reuse.

qcow2 internal snapshots cannot be exported this way: QEMU opens one read-only only through
``bdrv_snapshot_load_tmp``, which only ``qemu-nbd -l`` and ``qemu-img convert -l`` call; the storage daemon's
QMP (7.2) offers ``blockdev-snapshot-internal-sync`` and ``blockdev-snapshot-delete-internal-sync``, which
create and delete, and no ``--blockdev`` option selects a snapshot. Such mounts go to the nbd backend.

An ``overlay`` export serves its block node read-only below a qcow2 overlay that takes every write: how a
read-only mount replays a journal without writing to the image (:mod:`mountd.engine.volumes`). The overlay is
a file without a name (``O_TMPFILE`` in :data:`OVERLAY_DIR`, where QEMU itself puts the temporary overlays of
``-snapshot``), passed to the daemon as a descriptor: it lives exactly as long as the daemon, so nothing is
left behind however the daemon or we end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from mountd.errors import (
    BusyError,
    CommandError,
    FailedError,
    InvalidArgumentError,
    InvalidImageError,
    MountdError,
    UnsupportedError,
)
from mountd.host import command
from mountd.host.forked import report_output
from mountd.host.holders import FREE, file_usage
from mountd.host.loopdev import loops_backed_by
from mountd.host.mountinfo import mountinfo
from mountd.host.opener import fd_path
from mountd.host.processes import is_alive, proc_state, stop_process
from mountd.host.qemuerrors import QemuFailure, classify, last_words, qemu_error
from mountd.host.qemulocks import in_use_error
from mountd.host.qemusecret import secret_object
from mountd.host.users import openers_by_name
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec

log = logging.getLogger(__name__)

DAEMON = "qemu-storage-daemon"
NODE_NAME, EXPORT_ID, LOWER_NAME = "disk", "export", "lower"
OVERLAY_DIR = "/var/tmp"
START_TIMEOUT = 60.0


# ---- the layer -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSpec(Spec):
    kind: ClassVar[str] = "fuse"

    blockdev: str
    export: str
    read_only: bool
    snapshot: str
    virtual_size: int  # 0: unknown (then any non-empty export will do)
    overlay: bool = False  # writes go to a throwaway qcow2 overlay, the block node is only read
    key_fd: int = -1  # the memfd holding the key of an encrypted block node, handed to the attach in memory

    def identity(self) -> dict[str, Any]:
        return {"blockdev": self.blockdev, "export": self.export, "read_only": self.read_only,
                "snapshot": self.snapshot, "virtual_size": self.virtual_size, "overlay": self.overlay,
                "key_fd": self.key_fd}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> ExportSpec:
        try:
            spec = cls(str(identity["blockdev"]), str(identity["export"]),
                       bool(identity.get("read_only", True)), str(identity.get("snapshot") or ""),
                       int(identity.get("virtual_size") or 0), bool(identity.get("overlay", False)),
                       int(identity.get("key_fd", -1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"bad fuse layer plan {identity}: {exc}") from None
        if not os.path.isabs(spec.export) or "\n" in spec.export or not spec.blockdev:
            raise InvalidArgumentError(f"the FUSE export needs an absolute path and a blockdev: {identity}")
        if spec.overlay and (spec.read_only or spec.virtual_size <= 0):
            raise InvalidArgumentError(f"an overlay export is writable and needs its size: {identity}")
        return spec

    @property
    def pidfile(self) -> str:
        return f"{self.export}.pid"

    def argv(self, overlay: str = "") -> list[str]:
        """The daemon's command line; ``overlay``: the qcow2 file that takes an overlay export's writes."""
        ro, rw = ("on", "off") if self.read_only else ("off", "on")
        export = f"type=fuse,id={EXPORT_ID},node-name={NODE_NAME},mountpoint={_mount_arg(self.export)}"
        nodes = ["--blockdev", f"node-name={NODE_NAME},read-only={ro},{self.blockdev}"]
        if overlay:
            nodes = ["--blockdev", f"node-name={LOWER_NAME},read-only=on,{self.blockdev}",
                     "--blockdev", f"node-name={NODE_NAME},read-only=off,driver=qcow2,file.driver=file,"
                     f"file.filename={_mount_arg(overlay)},backing={LOWER_NAME}"]
        return [DAEMON, "--daemonize", "--pidfile", self.pidfile, *secret_object(self.key_fd), *nodes,
                "--export", f"{export},writable={rw},allow-other=off"]


class FuseExportLayer(Layer[str]):
    """The image as a raw file at ``export``, served by a ``qemu-storage-daemon`` of its own.

    Left behind on failure: nothing; the daemon (found by pid, or by its command line if we died before
    recording it) is stopped, a dead FUSE mount is unmounted and the export file removed. An overlay's file
    has no name and goes with the daemon.
    """

    kind = ExportSpec.kind

    def _attach(self, progress: Progress) -> LayerRecord:
        spec = ExportSpec.parse(self.identity)
        if spec.snapshot:
            raise UnsupportedError(f"the fuse backend cannot open internal snapshot {spec.snapshot!r} "
                                   "(qemu-storage-daemon has no way to): use --backend nbd")
        if spec.key_fd >= 0 and spec.key_fd not in self.fds:
            raise InvalidArgumentError("an encrypted export needs its key's descriptor")
        _create_export_file(spec.export)
        with overlay_file(spec.virtual_size) if spec.overlay else contextlib.nullcontext(-1) as fd:
            try:
                result = command.run(spec.argv(fd_path(fd) if fd >= 0 else ""), timeout=START_TIMEOUT,
                                     pass_fds=[x for x in (fd, spec.key_fd) if x >= 0])
            except CommandError as exc:
                raise _start_error(exc, spec) from None
        pid = _read_pid(spec.pidfile)
        found = proc_state(pid)
        if found is None:
            raise FailedError(f"{DAEMON} (pid {pid}) exited right after starting")
        report_output(f"{DAEMON} (pid {pid})", result.stderr)  # its exit status is the verdict, not this
        self.record = replace(self.record, identity={
            **self.identity, "node": spec.export, "pid": pid, "start_time": found.start_time})
        progress(self.record)
        _check_ready(spec)
        log.info("exported %s at %s (%s pid %d)", spec.blockdev, spec.export, DAEMON, pid)
        return self.record

    def verify(self) -> bool:
        if self.record.process is None or not is_alive(*self.record.process):
            return False
        return _fuse_mount(self.identity.get("export", "")) is not None

    @property
    def _export(self) -> str:
        return str(self.identity.get("export", ""))

    def _present(self) -> str | None:
        return self._export or None

    def _release(self, export: str, *, force: bool) -> None:
        users = [f"loop device {x}" for x in loops_backed_by(export)]
        users += [f"{program}, pid {pid}" for pid, program in openers_by_name(export)]
        if users:
            raise BusyError(f"the FUSE export {export} is still used by {', '.join(users)}: "
                            "detach them first")
        daemon = self._daemon(export)
        if daemon is not None:
            stop_process(*daemon, DAEMON, force=force)
        if _fuse_mount(export) is not None:  # the daemon died without unmounting (SIGKILL, crash)
            _unmount_dead(export)
        log.info("stopped the FUSE export %s", export)

    def _clean_up(self) -> None:
        if self._export:
            _remove_export(self._export)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._export}.pid")

    def _daemon(self, export: str) -> tuple[int, int] | None:
        process = self.record.process
        if process is not None:
            return process if is_alive(*process) else None
        # A crash between starting the daemon and recording it: find it by the export on its command line.
        return _find_daemon(export)


# ---- helpers ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def overlay_file(size: int) -> Iterator[int]:
    """An empty qcow2 image of ``size`` bytes, open at the descriptor yielded, in a file without a name (or,
    where the filesystem has no ``O_TMPFILE``, one unlinked at once): it is freed with its last descriptor."""
    where = OVERLAY_DIR if os.path.isdir(OVERLAY_DIR) else None
    with tempfile.TemporaryFile(dir=where, prefix="imgmount-overlay-") as f:
        fd = f.fileno()
        command.run(["qemu-img", "create", "-q", "-f", "qcow2", fd_path(fd), str(size)], pass_fds=(fd,))
        yield fd


def _mount_arg(path: str) -> str:
    return path.replace(",", ",,")  # QEMU option syntax: a literal comma is doubled


def _create_export_file(export: str) -> None:
    try:
        fd = os.open(export, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise BusyError(f"{export} already exists: another export uses that path") from None
    except OSError as exc:
        raise FailedError(f"cannot create the export file {export}: {exc.strerror}") from None
    os.close(fd)


def _read_pid(pidfile: str) -> int:
    try:
        return int(Path(pidfile).read_text().strip())
    except (OSError, ValueError) as exc:
        raise FailedError(f"{DAEMON} started but left no readable pidfile {pidfile}: {exc}") from None


def _start_error(exc: CommandError, spec: ExportSpec) -> MountdError:
    """A lock conflict becomes InUse naming the holder of the file concerned; anything else the error of
    its class (:mod:`mountd.host.qemuerrors`), in QEMU's words."""
    said = last_words(exc.stderr)
    files = _options_ending(spec.blockdev, "file.filename")  # the image, then its backing files
    image = files[0] if files else spec.blockdev
    if classify(said) != QemuFailure.LOCK:
        return qemu_error(said, image, doing="serve")
    for path in files:
        with contextlib.suppress(MountdError):
            if file_usage(path).state != FREE:
                return in_use_error(path, read_only=spec.read_only or path != files[0])
    return qemu_error(said, image)


def _options_ending(options: str, suffix: str) -> list[str]:
    """The values of the keys ending in ``suffix`` in a QEMU option string (``,,`` is a literal comma)."""
    found = []
    for part in options.replace(",,", "\0").split(","):
        name, _, value = part.partition("=")
        if name == suffix or name.endswith(f".{suffix}"):
            found.append(value.replace("\0", ","))
    return found


def _check_ready(spec: ExportSpec) -> None:
    """``--daemonize`` returned: the export must be mounted and as large as the image."""
    if _fuse_mount(spec.export) is None:
        raise FailedError(f"{DAEMON} started but {spec.export} is not a FUSE mount")
    size = os.stat(spec.export).st_size
    if spec.virtual_size and size != spec.virtual_size:
        # Only a rewrite of the image since it was inspected makes QEMU see another size: her doing, not ours.
        raise InvalidImageError(f"the image changed while it was being mounted: QEMU now serves {size} "
                                f"bytes, not the {spec.virtual_size} it had; mount it again when nothing "
                                "rewrites it")
    if size <= 0:
        raise FailedError(f"the FUSE export {spec.export} is empty")


def _fuse_mount(export: str) -> str | None:
    """The FUSE mount on ``export``, if any (read from mountinfo: never stat a possibly dead mount)."""
    for entry in mountinfo():
        if entry.mountpoint == export and (entry.fstype == "fuse" or entry.fstype.startswith("fuse.")):
            return entry.fstype
    return None


def _unmount_dead(export: str) -> None:
    # The server is gone, so nothing can be lost; lazy, because a reader stuck on it must not stop us.
    try:
        command.run(["umount", "--lazy", export], timeout=30)
    except CommandError as exc:
        if _fuse_mount(export) is not None:
            raise BusyError(f"cannot unmount the dead FUSE export {export}: {exc.stderr.strip()}") from None


def _remove_export(export: str) -> None:
    """Remove the empty file we created; anything else at that path is not ours to delete."""
    try:
        st = os.lstat(export)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BusyError(f"the FUSE export {export} is still mounted: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        os.unlink(export)
    else:
        log.warning("leaving %s alone: it is not the empty file the FUSE export was made on", export)


def _find_daemon(export: str) -> tuple[int, int] | None:
    needle = f"mountpoint={_mount_arg(export)},".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv and os.path.basename(argv[0]) == DAEMON.encode() and any(needle in a for a in argv):
                found = proc_state(int(pid))
                if found is not None and found.state not in ("Z", "X"):
                    return int(pid), found.start_time
    return None
