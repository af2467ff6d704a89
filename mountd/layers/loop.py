"""Loop devices made with our own ioctls, holding QEMU's image locks for as long as they exist.

Like udisks' ``LoopSetup``, we open the backing file ourselves and hand the kernel that fd
(``LOOP_CONFIGURE``). When asked, the fd first takes the OFD byte-range locks a QEMU user of the image would
take (design: "Refusing images in use"); the loop device keeps a reference to that open file description, so
the locks live exactly as long as the device, whatever happens to our process, and a VM cannot start on the
image meanwhile.

``LO_FLAGS_AUTOCLEAR`` is deliberately not set: the kernel clears an autoclear device on its last close, which
is our own close right after ``LOOP_CONFIGURE`` (checked on 6.x: the device is gone before anyone mounts it).
A device that will not come off is reported, never half-detached: ``LOOP_CLR_FD`` on a device someone still
has open "succeeds" and only marks it autoclear, so detach looks for users first and checks the result.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from mountd.errors import (
    BusyError,
    FailedError,
    InvalidArgumentError,
    NoFreeDeviceError,
    OperationTimeoutError,
)
from mountd.host.blockdev import BlockEvents, claim_exclusive, lock_out_udev
from mountd.host.loopdev import (
    INFO64,
    LOOP_GET_STATUS64,
    SYS_BLOCK,
    LoopStatus,
    get_status,
    loop_number,
    same_binding,
    sysfs_view,
)
from mountd.host.processes import link_target
from mountd.host.qemulocks import in_use_error, take_qemu_locks
from mountd.host.users import BlockUsers, block_users
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec

log = logging.getLogger(__name__)

LOOP_CLR_FD, LOOP_SET_STATUS64, LOOP_CONFIGURE = 0x4C01, 0x4C04, 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO = 1, 4, 16
#: struct loop_config: u32 fd, u32 block_size, struct loop_info64 info, u64 __reserved[8].
CONFIG = struct.Struct(f"=II{INFO64.size}s64x")

BLOCK_SIZES = (512, 1024, 2048, 4096)
MAX_CLAIMS = 16  # devices tried when others keep taking the free one first
SETTLE_TIMEOUT = 5.0


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for sysfs state that a block uevent announces (re-checked on each event, and now and then), or
    raise naming ``what``."""
    if not BlockEvents().wait(check, timeout):
        raise OperationTimeoutError(f"timed out after {timeout:g} s waiting for {what}")


# ---- the layer -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopSpec(Spec):
    kind: ClassVar[str] = "loop"

    backing: str
    offset: int
    size: int  # 0: to the end
    read_only: bool
    qemu_locks: bool
    block_size: int = 0  # 0: the kernel's default (512)
    direct_io: bool = False  # not over FUSE: the export serves O_DIRECT reads wrongly

    def identity(self) -> dict[str, Any]:
        return {"backing": self.backing, "offset": self.offset, "size": self.size,
                "read_only": self.read_only, "qemu_locks": self.qemu_locks, "block_size": self.block_size,
                "direct_io": self.direct_io}

    @classmethod
    def parse(cls, identity: dict[str, Any], *, resolve: bool = True) -> LoopSpec:
        """``resolve``: the backing file is root's to name (no descriptor given), so resolve its path."""
        try:
            backing = str(identity["backing"])
            spec = cls(os.path.realpath(backing) if resolve else backing, int(identity.get("offset") or 0),
                       int(identity.get("size") or 0), bool(identity.get("read_only", True)),
                       bool(identity.get("qemu_locks", False)), int(identity.get("block_size") or 0),
                       bool(identity.get("direct_io", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"bad loop layer plan {identity}: {exc}") from None
        if not os.path.isabs(str(identity["backing"])):
            raise InvalidArgumentError(f"the loop backing file must be an absolute path: {spec.backing}")
        if spec.offset < 0 or spec.size < 0 or spec.block_size not in (0, *BLOCK_SIZES):
            raise InvalidArgumentError(f"bad loop offset, size or block size in {identity}")
        return spec


class LoopLayer(Layer[int]):
    """A loop device on a file or block device, at an offset and size.

    Left behind on failure: nothing. The backing fd (and so its locks) is closed unless the kernel took it;
    a device found bound to anything but our file (by st_dev/st_ino and offset) is never touched.
    """

    kind = LoopSpec.kind

    def _attach(self, progress: Progress) -> LayerRecord:
        spec = LoopSpec.parse(self.identity, resolve=not self.fds)
        fd = _given_backing(self.fds[0], spec) if self.fds else _open_backing(spec)
        try:
            st = os.fstat(fd)
            _check_extent(spec, fd, st)
            if spec.qemu_locks and not take_qemu_locks(fd, read_only=spec.read_only):
                os.close(fd)
                fd = -1
                raise in_use_error(spec.backing, read_only=spec.read_only,
                                   fd=self.fds[0] if self.fds else None)
            known = {**self.identity, "backing": spec.backing, "offset": spec.offset, "size": spec.size,
                     "backing_dev": st.st_dev, "backing_ino": st.st_ino}
            node = self._claim(fd, spec, known, progress)
        finally:
            if fd >= 0:
                os.close(fd)
        number = loop_number(node) or 0
        # LOOP_CONFIGURE sets the capacity before it returns; this bounded check catches a kernel that
        # publishes it later (sysfs sends no event we can wait on without udevd).
        wait_until(lambda: (sysfs_view(number) or {}).get("size_bytes", 0) > 0, SETTLE_TIMEOUT,
                   f"{node} to have a size")
        log.info("attached %s to %s at offset %d", node, spec.backing, spec.offset)
        return replace(self.record, identity={**self.record.identity, "sysfs": sysfs_view(number)})

    def _claim(self, fd: int, spec: LoopSpec, known: dict[str, Any], progress: Progress) -> str:
        """Take a free device and configure it; another process taking it first (EBUSY) is normal."""
        for _ in range(MAX_CLAIMS):
            number = _get_free()
            node = _ensure_node(number)
            self.record = replace(self.record, identity={**known, "node": node, "devnum": _devnum(number)})
            progress(self.record)
            try:
                _configure(node, fd, spec)
                return node
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise FailedError(f"cannot configure {node} on {spec.backing}: {exc.strerror}") from None
        raise NoFreeDeviceError(f"no free loop device after {MAX_CLAIMS} tries: others keep taking them")

    def verify(self) -> bool:
        number = loop_number(self.node)
        if number is None or not self._sysfs_matches(number, by_name=False):
            return False
        status = _status(self.node)
        return isinstance(status, LoopStatus) and self._ours(status)

    def _sysfs_matches(self, number: int, *, by_name: bool = True) -> bool:
        """What sysfs shows is what we made; ``by_name`` also compares the backing file's name, which only
        stands in for its identity where the kernel cannot tell the inode (a renamed file keeps its inode)."""
        view, ident = sysfs_view(number), self.identity
        if view is None:
            return False
        if by_name and view["backing_file"].removesuffix(" (deleted)") != ident.get("backing"):
            return False
        return (view["offset"], view["sizelimit"], view["dev"]) == (
            ident.get("offset"), ident.get("size"), ident.get("devnum"))

    def _ours(self, status: LoopStatus) -> bool:
        ident = self.identity
        if "backing_dev" not in ident:
            return False
        return _same_dev(status.device, ident["backing_dev"]) and status.inode == ident["backing_ino"] \
            and (status.offset, status.sizelimit) == (ident.get("offset"), ident.get("size"))

    def _present(self) -> int | None:
        """The device's number, while it is still bound to what we bound it to."""
        number = loop_number(self.node)
        if number is None or sysfs_view(number) is None:
            return None  # never configured, or already gone
        status = _status(self.node)
        if status == errno.ENXIO:
            return None
        # The kernel answers LOOP_GET_STATUS64 by stat-ing the backing file, which fails on a dead FUSE
        # export (ENOTCONN): then sysfs alone (path, offset, size, device number) must tell it is ours.
        ours = self._ours(status) if isinstance(status, LoopStatus) else self._sysfs_matches(number)
        if not ours:
            log.warning("%s now backs something else: leaving it alone", self.node)
            return None
        return number

    def _release(self, number: int, *, force: bool) -> None:
        fd = claim_exclusive(self.node)  # EBUSY: mounted or claimed by the kernel, even where we cannot see
        if fd is not None and not lock_out_udev(fd, SETTLE_TIMEOUT):
            os.close(fd)
            raise BusyError(f"{self.node} is locked by another program (udev probing it?): try again")
        users = device_users(number, self.node, own_fd=fd)
        if fd is None or users:
            if fd is not None:
                os.close(fd)
            users = users or ["claimed by the kernel (a mount in another namespace, or a lazy unmount)"]
            if not force:
                raise BusyError(f"{self.node} is busy: {'; '.join(users)}: stop using it first")
            # Forced (after a lazy unmount): the kernel detaches it at its last close. Nothing is at risk, the
            # backing file stays open until then, so the mount record can go.
            _clear(self.node)
            log.warning("%s is busy (%s): it will detach itself once released", self.node, "; ".join(users))
            return
        self._clear(fd, number, force=force)
        log.info("detached %s", self.node)

    def _clear(self, fd: int, number: int, *, force: bool) -> None:
        """LOOP_CLR_FD through our exclusive ``fd`` (closed here), then wait until the device no longer backs
        what it did: freed, it may at once be taken by another mount (LOOP_CTL_GET_FREE hands it out), which
        is not a late user of ours. Only sysfs is read: an open of ours could make that other mount's own
        detach find the device "open by" us."""
        before = sysfs_view(number)  # ours (checked by inode): the binding that must go
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: unbound meanwhile
                raise FailedError(f"cannot detach {self.node}: {exc.strerror}") from None
        finally:
            os.close(fd)  # the clear happens at this last close
        def still() -> bool:
            return before is not None and same_binding(sysfs_view(number), before)

        with contextlib.suppress(OperationTimeoutError):
            wait_until(lambda: not still(), SETTLE_TIMEOUT, f"{self.node} to be released")
        if still():  # someone opened it between our check and our close
            if not force:
                _cancel_autoclear(self.node)
            users = device_users(number, self.node) or ["an opener that is not visible here"]
            raise BusyError(f"{self.node} is busy: {'; '.join(users)}: stop using it first")


# ---- kernel calls ----------------------------------------------------------------------------------------


def _open_backing(spec: LoopSpec) -> int:
    flags = (os.O_RDONLY if spec.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW
    try:
        st = os.stat(spec.backing)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidArgumentError(f"{spec.backing} is not a regular file or a block device")
        return os.open(spec.backing, flags)
    except OSError as exc:
        raise FailedError(f"cannot open {spec.backing}: {exc.strerror}") from None


def _given_backing(fd: int, spec: LoopSpec) -> int:
    """Our own duplicate of a descriptor the caller opened: the kernel gets exactly that file, and a
    read-write device only from a descriptor opened read-write."""
    if not spec.read_only and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise InvalidArgumentError(f"{spec.backing} was opened read-only: it cannot back a read-write device")
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)


def _check_extent(spec: LoopSpec, fd: int, st: os.stat_result) -> None:
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidArgumentError(f"{spec.backing} is not a regular file or a block device")
    total = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
    room = total - spec.offset if not spec.size else min(spec.size, total - spec.offset)
    if room < (spec.block_size or 512):
        raise InvalidArgumentError(
            f"{spec.backing} ({total} bytes) has no room for a device at offset {spec.offset}")


def _get_free() -> int:
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        return int(fcntl.ioctl(ctl, LOOP_CTL_GET_FREE))
    except OSError as exc:
        raise NoFreeDeviceError(f"the kernel has no free loop device: {exc.strerror}") from None
    finally:
        os.close(ctl)


def _devnum(number: int) -> str:
    return (SYS_BLOCK / f"loop{number}" / "dev").read_text().strip()


def _ensure_node(number: int) -> str:
    """``/dev/loopN``, made from sysfs where no devtmpfs or udev made it (static /dev in containers)."""
    node = f"/dev/loop{number}"
    major, minor = (int(x) for x in _devnum(number).split(":"))
    try:
        st = os.stat(node)
    except FileNotFoundError:
        os.mknod(node, stat.S_IFBLK | 0o660, os.makedev(major, minor))
        return node
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(major, minor):
        raise FailedError(f"{node} is not the block device {major}:{minor}: fix /dev")
    return node


def _configure(node: str, fd: int, spec: LoopSpec) -> None:
    name = os.fsencode(spec.backing)[:63]
    # Direct I/O: the data is cached once, by the filesystem on the loop device, not again as the backing
    # file's pages. The kernel quietly falls back to buffered I/O where the offset or block size forbid it.
    flags = (LO_FLAGS_READ_ONLY if spec.read_only else 0) | (LO_FLAGS_DIRECT_IO if spec.direct_io else 0)
    info = INFO64.pack(0, 0, 0, spec.offset, spec.size, 0, 0, 0, flags, name, b"", b"", 0, 0)
    dev = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # as systemd does: udev does not probe a device locked so
            fcntl.flock(dev, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.ioctl(dev, LOOP_CONFIGURE, CONFIG.pack(fd, spec.block_size, info))
    finally:
        os.close(dev)


def _status(node: str) -> LoopStatus | int:
    """The device's status, or the errno that refused it (ENXIO: it backs nothing)."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        return get_status(fd)
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        os.close(fd)


def _same_dev(kernel: int, ours: int) -> bool:
    """lo_device is the kernel's huge_encode_dev; st_dev is glibc's: compare major and minor."""
    k_major, k_minor = (kernel & 0xFFF00) >> 8, (kernel & 0xFF) | ((kernel >> 12) & 0xFFF00)
    return (k_major, k_minor) == (os.major(ours), os.minor(ours))


def _clear(node: str) -> None:
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, LOOP_CLR_FD)
    finally:
        os.close(fd)


def _cancel_autoclear(node: str) -> None:
    """Undo a deferred LOOP_CLR_FD, so a refused detach leaves the device exactly as it was."""
    with contextlib.suppress(OSError):
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = list(INFO64.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(INFO64.size))))
            info[8] &= ~LO_FLAGS_AUTOCLEAR
            fcntl.ioctl(fd, LOOP_SET_STATUS64, INFO64.pack(*info))
        finally:
            os.close(fd)


def device_users(number: int, node: str, *, own_fd: int | None = None) -> list[str]:
    """Who holds ``loopN``, in the loop layer's words: mounts, kernel holders (dm, md), loop devices on it,
    processes with it open, this process through any fd but ``own_fd``."""
    users = _worded(block_users(f"loop{number}"))
    ours = (fd for fd in os.listdir("/proc/self/fd") if fd != str(own_fd))
    if any(link_target(f"/proc/self/fd/{fd}") == node for fd in ours):
        users.append(f"open by this process (pid {os.getpid()})")  # block_users never counts us
    return users


def _worded(users: BlockUsers) -> list[str]:
    return [*(f"mounted on {mountpoint}" for _, mountpoint in users.mounts),
            *(f"held by {s.sysname}" for s in users.stacked),
            *(f"backing {loop}" for loop, _ in users.loops),
            *(f"open by {h}" for _, h in users.openers)]
