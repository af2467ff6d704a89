"""The nbd backend: ``qemu-nbd -c`` onto ``/dev/nbdN``, and the kernel's partition nodes on it (design: "Block
device backends", "Partitions").

Facts this code relies on, checked on Debian 12 (QEMU 7.2, kernel 6.1):

- ``qemu-nbd --fork -c DEV`` returns once the server is set up and has written its pid file, *before* the
  kernel device is necessarily connected (2 of 8 devices were not, at return, in the VM lane), and exits 0
  even when the connect then fails (a device taken by another server: "Failed to set NBD socket"). So the
  exit status says little: after it we wait, by uevent, until the device's ``pid`` attribute names our
  server and its size is set (success), or until our server exits (failure; watched through a pidfd).
  The kernel serialises the connect itself (NBD_SET_SOCK from a second task fails with EBUSY), so two
  attaches racing for one device cannot both win; the loser moves on to the next device.
- The daemonised server is in its own session (qemu-nbd calls ``daemon(3)``); sysfs ``pid`` is the id of its
  client *thread*, whose Tgid is the server's pid.
- ``qemu-nbd -d`` on a device that is mounted or open succeeds, the server exits, and the device keeps its
  ``pid`` and size (dead) until the last opener closes it. So detach refuses a held device before
  disconnecting, holds an exclusive open across the disconnect (its ioctls, made on that descriptor: no
  ``qemu-nbd -d`` process), and verifies afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from mountd.errors import (
    BusyError,
    CommandError,
    FailedError,
    InvalidArgumentError,
    InvalidImageError,
    NoFreeDeviceError,
    OperationTimeoutError,
)
from mountd.host.blockdev import BlockEvents, claim_exclusive, lock_out_udev
from mountd.host.forked import holds_open, run_forked
from mountd.host.nbddev import (
    SECTOR,
    device_size,
    ensure_nbd_module,
    is_free,
    nbd_devices,
    read_int,
    server_pid,
)
from mountd.host.processes import has_exited, open_process, start_time, stop
from mountd.host.qemuerrors import last_words, qemu_error
from mountd.host.qemusecret import secret_object
from mountd.host.users import SYS_CLASS_BLOCK, block_users
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec
from mountd.settings import DEFAULT_STATE_DIR

log = logging.getLogger(__name__)

ATTACH_TIMEOUT = 30.0
DETACH_TIMEOUT = 30.0
#: Re-check interval while waiting: events wake us at once, but some states have no event of their own
#: (the nbd ``pid`` attribute is removed after the last uevent of a disconnect).
TICK = 0.05
BLKFLSBUF = 0x1261  # _IO(0x12, 97): what ``blockdev --flushbufs`` does
BLKRRPART = 0x125F  # _IO(0x12, 95): re-read the partition table
#: _IO(0xab, 8) and _IO(0xab, 4): what ``qemu-nbd -d`` does (its NBD_CLEAR_QUE first is a no-op since 4.0):
#: the kernel asks the server to end the connection, then drops its socket.
NBD_DISCONNECT, NBD_CLEAR_SOCK = 0xAB08, 0xAB04
CACHE_MODE = "writeback"  # qemu-nbd's default; cache=none needs O_DIRECT, which tmpfs and 9p lack


# --- who holds a block device ------------------------------------------------------------------------------


def block_holders(name: str, ignore_pids: Collection[int] = ()) -> list[str]:
    """What holds block device ``name`` (``nbd3``, ``nbd3p1``) or one of its partitions."""
    return block_users(name, ignore_pids=ignore_pids).described()


def _busy(what: str, holders: list[str]) -> BusyError:
    return BusyError(f"{what} is in use ({'; '.join(holders) or 'held open by the kernel'}): "
                     "unmount or close it first")


# --- the nbd layer -----------------------------------------------------------------------------------------


class _LostRace(Exception):
    """Another server took the device first: try the next one."""


@dataclass(frozen=True)
class NbdSpec(Spec):
    kind: ClassVar[str] = "nbd"

    image_opts: str  # a pinned ``--image-opts`` string
    read_only: bool
    snapshot: str = ""  # an internal snapshot, attached read-only
    servers: str = f"{DEFAULT_STATE_DIR}/nbd"  # where the server's pid file and socket go (root's own)
    key_fd: int = -1  # the memfd holding the key of an image QEMU encrypted, handed to the attach in memory

    def identity(self) -> dict[str, Any]:
        return {"image_opts": self.image_opts, "read_only": self.read_only, "snapshot": self.snapshot,
                "servers": self.servers, "key_fd": self.key_fd}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> NbdSpec:
        try:
            spec = cls(str(identity["image_opts"]), bool(identity.get("read_only", True)),
                       str(identity.get("snapshot") or ""), str(identity.get("servers") or cls.servers),
                       int(identity.get("key_fd", -1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"bad nbd layer plan: {exc}") from None
        if spec.snapshot and not spec.read_only:
            raise InvalidArgumentError("an internal snapshot can only be attached read-only")
        return spec


class NbdLayer(Layer[int]):
    """A QEMU image served on ``/dev/nbdN`` by a ``qemu-nbd`` that outlives us.

    Identity in: ``image_opts`` (a pinned ``--image-opts`` string), ``read_only``, ``snapshot`` (an internal
    snapshot name, read-only). Out: ``node``, ``pid_file``, ``pid``, ``start_time``, ``size``. Left behind
    on failure: nothing (a server that never connected is stopped); a crash mid-attach leaves a record
    naming the device and the pid file, which is enough for :meth:`detach`.
    """

    kind = NbdSpec.kind

    def _attach(self, progress: Progress) -> LayerRecord:
        spec = NbdSpec.parse(self.identity)
        ensure_nbd_module()
        events = BlockEvents()
        servers = Path(spec.servers)
        servers.mkdir(parents=True, exist_ok=True, mode=0o700)
        devices = nbd_devices()
        planned = spec.identity()
        for name in devices:
            if not is_free(name):
                continue
            pid_file = servers / f"{name}-{uuid.uuid4().hex[:8]}.pid"
            self.record = replace(self.record, identity={
                **planned, "node": f"/dev/{name}", "pid_file": str(pid_file)})
            progress(self.record)
            try:
                return self._connect(spec, name, pid_file, events, progress)
            except _LostRace:
                log.debug("lost the race for /dev/%s; trying the next device", name)
                _remove_files(pid_file)
        raise NoFreeDeviceError(f"all {len(devices)} nbd devices are in use: unmount something, or load nbd "
                                "with a higher nbds_max")

    @staticmethod
    def _argv(spec: NbdSpec, name: str, pid_file: Path) -> list[str]:
        # A socket of its own: the default (/var/lock/qemu-nbd-nbdN) is shared by all who race for nbdN, and
        # QEMU unlinks an existing socket before it binds, so one racer's client could reach another's server.
        sock = pid_file.with_suffix(".sock")
        argv = ["qemu-nbd", "--fork", "--pid-file", str(pid_file), "--socket", str(sock),
                "-c", f"/dev/{name}", f"--cache={CACHE_MODE}"]
        if spec.read_only:
            argv.append("--read-only")
        if spec.snapshot:
            argv += ["-l", "snapshot.name=" + spec.snapshot.replace(",", ",,")]
        return [*argv, *secret_object(spec.key_fd), "--image-opts", spec.image_opts]

    def _connect(self, spec: NbdSpec, name: str, pid_file: Path, events: BlockEvents,
                 progress: Progress) -> LayerRecord:
        try:  # warnings on stderr (Debian's DMG modules) make qemu-nbd exit 1 though its server runs
            result = run_forked(self._argv(spec, name, pid_file), pid_file, timeout=ATTACH_TIMEOUT,
                                pass_fds=(spec.key_fd,) if spec.key_fd >= 0 else ())
        except CommandError as exc:
            raise _qemu_nbd_error(exc, name) from None
        pid = read_int(pid_file, -1)
        started = start_time(pid) if pid > 0 else None
        pidfd = open_process(pid, started)
        if pidfd is None:  # the server wrote its pid file and died already
            if not is_free(name):
                raise _LostRace
            raise FailedError(f"qemu-nbd exited before /dev/{name} was connected: {result.stderr.strip()}")
        try:
            self.record = replace(self.record, identity={**self.identity, "pid": pid, "start_time": started})
            progress(self.record)
            served = events.wait(lambda: has_exited(pidfd) or self._served(name), ATTACH_TIMEOUT, also=pidfd)
            if served and not has_exited(pidfd):
                size = device_size(name)
                return replace(self.record, identity={**self.identity, "size": size})
            if served and not is_free(name):
                raise _LostRace
            if not served:
                stop(pidfd, f"qemu-nbd (pid {pid})", force=True)
                raise OperationTimeoutError(f"/dev/{name} was not connected within {ATTACH_TIMEOUT:g} s of "
                                            "qemu-nbd -c")
            raise FailedError(f"qemu-nbd exited before /dev/{name} was connected: "
                              f"{result.stderr.strip() or 'no error output'}")
        finally:
            os.close(pidfd)

    def _served(self, name: str) -> bool:
        return server_pid(name) == self.identity.get("pid") and device_size(name) > 0

    def _server(self) -> int | None:
        """A pidfd on our server if it still runs: by recorded pid and start time, else (a crash before
        they were recorded) by the pid file, which the server keeps open."""
        pid = self.identity.get("pid")
        if isinstance(pid, int):
            return open_process(pid, self.identity.get("start_time"))
        pid_file = str(self.identity.get("pid_file", ""))
        pid = read_int(Path(pid_file), -1) if pid_file else -1
        if pid <= 0:
            return None
        started = start_time(pid)
        pidfd = open_process(pid, started)
        if pidfd is not None and not holds_open(pid, pid_file):
            os.close(pidfd)
            return None
        if pidfd is not None:
            self.record = replace(self.record, identity={**self.identity, "pid": pid, "start_time": started})
        return pidfd

    def _present(self) -> int | None:
        """The pid of our server while it runs; else it never started, or has gone: the device (if taken)
        is someone else's."""
        pidfd = self._server() if self.node else None
        if pidfd is None:
            return None
        os.close(pidfd)
        return int(self.identity["pid"])  # recorded by _server, if only its pid file named it

    def _release(self, pid: int, *, force: bool) -> None:
        """Disconnect and verify. ``force`` changes nothing: a held device is never pulled from under its
        user (that turns a busy mount into I/O errors); the holders are named instead."""
        name = os.path.basename(self.node)
        pidfd = open_process(pid, self.identity.get("start_time"))
        if pidfd is None:
            return  # it exited meanwhile
        try:
            if server_pid(name) != pid:  # ours, but never connected (a half-done attach)
                stop(pidfd, f"qemu-nbd (pid {pid})", force=True)
            else:
                self._disconnect(self.node, name, pid, pidfd)
        finally:
            os.close(pidfd)

    def _clean_up(self) -> None:
        if self.identity.get("pid_file"):
            _remove_files(Path(self.identity["pid_file"]))

    def _disconnect(self, node: str, name: str, pid: int, pidfd: int) -> None:
        events = BlockEvents()
        fd = claim_exclusive(node)
        if fd is None:
            raise _busy(node, block_holders(name, ignore_pids={pid}))
        try:  # the exclusive open keeps anyone from mounting it between the check and the disconnect
            holders = [] if lock_out_udev(fd) else ["udev is still processing it"]
            holders += block_holders(name, ignore_pids={pid})
            if holders:
                raise _busy(node, holders)
            os.fsync(fd)  # dirty pages out, and a flush request to the server
            fcntl.ioctl(fd, BLKFLSBUF)
            for request in (NBD_DISCONNECT, NBD_CLEAR_SOCK):
                with contextlib.suppress(OSError):  # as qemu-nbd -d: whether it let go is seen below
                    fcntl.ioctl(fd, request)
        finally:
            os.close(fd)
        if not events.wait(lambda: has_exited(pidfd) and is_free(name), DETACH_TIMEOUT, also=pidfd):
            held = "; ".join(block_holders(name, ignore_pids={pid})) or "by the kernel"
            raise BusyError(f"{node} is disconnected but still held ({held}): the kernel frees it once that "
                            "lets go")

    def verify(self) -> bool:
        name = os.path.basename(self.node)
        pid = self.identity.get("pid")
        return (bool(name) and isinstance(pid, int) and server_pid(name) == pid
                and start_time(pid) == self.identity.get("start_time")
                and device_size(name) == self.identity.get("size"))


def _remove_files(pid_file: Path) -> None:
    """A server's pid file, and its socket (which it removes itself, unless it was killed)."""
    for path in (pid_file, pid_file.with_suffix(".sock")):
        path.unlink(missing_ok=True)


def _qemu_nbd_error(exc: CommandError, name: str) -> Exception:
    if "NBD socket" in exc.stderr or "Device or resource busy" in exc.stderr:
        return _LostRace()
    return qemu_error(last_words(exc.stderr), "the image", doing="serve")


# --- kernel partitions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionSpec(Spec):
    kind: ClassVar[str] = "partition"

    parent: str  # /dev/nbdN
    number: int
    start: int  # bytes, from our parser
    size: int

    def identity(self) -> dict[str, Any]:
        return {"parent": self.parent, "number": self.number, "start": self.start, "size": self.size}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> PartitionSpec:
        try:
            return cls(str(identity["parent"]), int(identity["number"]), int(identity["start"]),
                       int(identity["size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"bad partition layer plan: {exc}") from None

    @property
    def name(self) -> str:
        return f"{os.path.basename(self.parent)}p{self.number}"


class KernelPartitionLayer(Layer[PartitionSpec]):
    """The kernel's own node for partition K of an nbd device, checked against our parser's reading.

    Identity in: ``parent`` (``/dev/nbdN``), ``number``, ``start`` and ``size`` (bytes, from
    :mod:`mountd.image.partitions`). Out: ``node``. Nothing is created: the node comes and goes with the
    parent.
    """

    kind = PartitionSpec.kind

    @property
    def _spec(self) -> PartitionSpec:
        return PartitionSpec.parse(self.identity)

    @property
    def _name(self) -> str:
        return self._spec.name

    def _seen(self) -> tuple[int, int] | None:
        """(start, size) in bytes of partition K as the kernel shows it, or None."""
        sys_dir = SYS_CLASS_BLOCK / self._name
        start, size = read_int(sys_dir / "start", -1), read_int(sys_dir / "size", -1)
        return (start * SECTOR, size * SECTOR) if start >= 0 and size >= 0 else None

    def _matches(self) -> bool:
        return self._seen() == (self._spec.start, self._spec.size) and os.path.exists(
            f"/dev/{self._name}")

    def _attach(self, progress: Progress) -> LayerRecord:
        """Re-read the table only if the kernel's scan at connect time did not already get partition K right.

        Not ``partprobe``: it opens the disk read-write, and when it closes it udevd's watch re-reads the
        whole table (BLKRRPART) *after* partprobe has returned, so every partition node vanishes for a moment
        (seen in the VM lane). BLKRRPART through a read-only descriptor, under udev's lock, is synchronous
        (devtmpfs makes the nodes before it returns) and triggers nothing.
        """
        parent, number = self._spec.parent, self._spec.number
        fd = os.open(parent, os.O_RDONLY | os.O_CLOEXEC)
        reread = ""
        try:
            lock_out_udev(fd)  # udev neither probes nor re-reads the table while we look
            if not self._matches():
                try:
                    fcntl.ioctl(fd, BLKRRPART)
                except OSError as exc:  # EBUSY: another partition of the disk is in use
                    reread = f" (the kernel could not re-read the table: {exc.strerror})"
            if not self._matches():
                raise InvalidImageError(f"the kernel sees partition {number} of {parent} at "
                                        f"{_where(self._seen())}, our parser at "
                                        f"{_where((self._spec.start, self._spec.size))}{reread}")
            _pin(self._name)
        finally:
            os.close(fd)
        node = f"/dev/{self._name}"
        return replace(self.record, identity={**self.identity, "node": node})

    def _present(self) -> PartitionSpec | None:
        spec = self._spec
        return spec if self.node and (SYS_CLASS_BLOCK / spec.name).exists() else None

    def unpin(self) -> None:
        _unpin(self._name)

    def _release(self, spec: PartitionSpec, *, force: bool) -> None:
        """Nothing to remove (the node comes and goes with its parent): only refuse while it is in use."""
        self.unpin()
        try:
            fd = os.open(spec.parent, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # the parent is gone, and its partitions with it
        try:
            holders = [] if lock_out_udev(fd) else ["udev is still processing it"]
            holders += block_holders(spec.name)
        finally:
            os.close(fd)
        if holders:
            raise _busy(self.node, holders)

    def verify(self) -> bool:
        return bool(self.node) and self._matches()


#: Partitions (kernel names) this process holds open while the mount that uses them is built. The kernel
#: re-reads no table of a disk with a partition open (EBUSY), and udevd tries to whenever a writer of the disk
#: closes it: late, under load (qemu-nbd's close of the mount before, on the same device), and all of the
#: disk's partition nodes go and come back, under the layers being stacked on them.
_PINNED: dict[str, int] = {}
_PINNED_LOCK = threading.Lock()


def _pin(name: str) -> None:
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedError(f"cannot open /dev/{name}: {exc.strerror}") from None
    with _PINNED_LOCK:
        _PINNED[name], old = fd, _PINNED.get(name)
    if old is not None:
        os.close(old)


def _unpin(name: str) -> None:
    with _PINNED_LOCK:
        fd = _PINNED.pop(name, None)
    if fd is not None:
        os.close(fd)


def _where(place: tuple[int, int] | None) -> str:
    if place is None:
        return "nowhere (no such partition)"
    start, size = place
    return f"byte {start} ({size} bytes)"
