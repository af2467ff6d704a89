"""Who holds an image file: QEMU's OFD lock bytes, plus a scan of ``/proc/*/fd``.

QEMU locks byte ``100+n`` ("holds permission n") and ``200+n`` ("does not share permission n") of every
image it opens (n: 0 consistent-read, 1 write, 2 write-unchanged, 3 resize). ``F_OFD_GETLK`` on those bytes
sees the locks of every process, even ones this host's ``/proc`` does not show, but not who holds them. The
``/proc`` scan gives the pid, the program, the open mode and (``fdinfo`` ``lock:`` lines) each process's own
lock bytes, and is the only way to see a VM started with ``file.locking=off``. Both are combined; see
:func:`effective_lock_bytes`.

Nothing here takes a lock or opens a file for writing.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mountd.errors import InUseError, InvalidImageError, NotFoundError
from mountd.host.processes import entries, not_yet_execed_child, program_name

FREE, READ_ONLY, READ_WRITE = "free", "read-only", "read-write"

#: The byte QEMU locks while it holds the write permission.
WRITE_BYTE = 101
#: Every byte QEMU may lock: 100-103 "holds permission n", 200-203 "does not share permission n".
LOCK_BYTES: tuple[int, ...] = (100, 101, 102, 103, 200, 201, 202, 203)

#: 36 on every Linux architecture (asm-generic/fcntl.h).
F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
#: struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid. Native alignment, and
#: the trailing "0q" pads the end to off_t's alignment, as the C compiler does (32 bytes on x86_64).
FLOCK_FORMAT = "@hhqqi0q"


@dataclass(frozen=True)
class Flock:
    l_type: int
    l_whence: int
    l_start: int
    l_len: int
    l_pid: int


def pack_flock(lock: Flock) -> bytes:
    return struct.pack(FLOCK_FORMAT, lock.l_type, lock.l_whence, lock.l_start, lock.l_len, lock.l_pid)


def unpack_flock(data: bytes) -> Flock:
    return Flock(*struct.unpack(FLOCK_FORMAT, data))


@dataclass(frozen=True)
class Holder:
    pid: int
    program: str  # basename of /proc/PID/exe, else comm
    writable: bool  # the process has the file open for writing (fdinfo flags, O_ACCMODE)
    lock_bytes: frozenset[int] = frozenset()  # QEMU lock bytes this process holds on the file (fdinfo)

    @property
    def writer(self) -> bool:
        """Open for writing, or holding QEMU's write permission."""
        return self.writable or WRITE_BYTE in self.lock_bytes

    def __str__(self) -> str:
        return f"{self.program}, pid {self.pid}"


@dataclass(frozen=True)
class FileUsage:
    path: str  # the file checked: symlinks resolved
    state: str  # FREE | READ_ONLY | READ_WRITE
    locked: bool  # QEMU-style OFD locks are present on the file (other than those of ignored pids)
    holders: tuple[Holder, ...]  # writers first; never this process itself, nor ignored pids
    lock_bytes: frozenset[int] = frozenset()  # the QEMU lock bytes held, as counted for ``state``

    def blamed(self) -> tuple[Holder, ...]:
        """The holders that make the state what it is: the writers of a file in use read-write."""
        if self.state == READ_WRITE:
            return tuple(h for h in self.holders if h.writer)
        return self.holders

    def describe(self) -> str:
        """``free`` or ``in use read-write by qemu-system-x86_64, pid 1234``."""
        if self.state == FREE:
            return FREE
        blamed = self.blamed()
        if not blamed:
            lock = "write" if self.state == READ_WRITE else "read"
            return f"in use {self.state} by a process not visible here (it holds QEMU's {lock} lock)"
        return f"in use {self.state} by {_join([str(h) for h in blamed])}"


class ImageInUseError(InUseError):
    def __init__(self, message: str, usage: FileUsage) -> None:
        super().__init__(message)
        self.usage = usage


# ---- pure decisions --------------------------------------------------------------------------------------


def decide_state(lock_bytes: Collection[int], holders: Iterable[Holder]) -> str:
    holders = tuple(holders)
    if WRITE_BYTE in lock_bytes or any(h.writable for h in holders):
        return READ_WRITE
    if lock_bytes or holders:
        return READ_ONLY
    return FREE


def effective_lock_bytes(
    probed: frozenset[int], others: frozenset[int], ignored: frozenset[int]
) -> frozenset[int]:
    """The lock bytes that count: those of visible non-ignored processes (``others``), plus every probed
    byte that no ignored process explains (its holder is invisible: another pid namespace, a lock kept alive
    by a loop device's reference to the file). A byte held both by an ignored and by an invisible process is
    missed: ``F_OFD_GETLK`` reports one conflicting lock per byte, never who holds it."""
    return others | (probed - ignored)


@dataclass(frozen=True)
class FdInfo:
    flags: int
    lock_bytes: frozenset[int]

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def parse_fdinfo(text: str) -> FdInfo:
    """Parse ``/proc/PID/fdinfo/N``: ``flags:`` (octal) and the ``lock:`` lines of locks held through this
    fd, e.g. ``lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2146369 100 101`` (inclusive; ``EOF`` = open end)."""
    flags = 0
    held: set[int] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "flags":
            flags = int(value.strip() or "0", 8)
        elif key == "lock":
            held |= _lock_line_bytes(value.split())
    return FdInfo(flags, frozenset(held))


def _lock_line_bytes(fields: list[str]) -> set[int]:
    # Waiting requests ("->") hold nothing; flock() and leases are whole-file and never byte-range locks.
    if len(fields) < 8 or "->" in fields or fields[1] not in ("OFDLCK", "POSIX"):
        return set()
    try:
        start = int(fields[-2])
        end = None if fields[-1] == "EOF" else int(fields[-1])
    except ValueError:
        return set()
    return {b for b in LOCK_BYTES if start <= b and (end is None or b <= end)}


# ---- the lock probe --------------------------------------------------------------------------------------


def probe_lock_bytes(fd: int) -> frozenset[int]:
    """The QEMU lock bytes that any open file description other than ``fd``'s holds.

    ``F_OFD_GETLK`` with ``F_WRLCK`` conflicts with every lock, read or write, and only tests: it never takes
    a lock, and it works through a read-only fd (only setting a write lock needs a writable one). Each byte is
    probed alone because the answer names one conflicting lock, not all of them."""
    held = set()
    for byte in LOCK_BYTES:
        query = pack_flock(Flock(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        try:
            answer = unpack_flock(fcntl.fcntl(fd, F_OFD_GETLK, query))
        except OSError:  # no OFD locks here (old kernel, some filesystems): /proc alone must tell
            return frozenset()
        if answer.l_type != fcntl.F_UNLCK:
            held.add(byte)
    return frozenset(held)


# ---- file identity, without asking the filesystem --------------------------------------------------------

Key = tuple[int, int]  # (st_dev, st_ino) of a regular file; (-1, st_rdev) of a block device

AT_FDCWD, AT_STATX_DONT_SYNC, STATX_TYPE, STATX_INO = -100, 0x4000, 0x1, 0x100


def _load_statx() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


_STATX = _load_statx()


def _key(mode: int, dev: int, ino: int, rdev: int) -> Key | None:
    if stat.S_ISREG(mode):
        return (dev, ino)
    if stat.S_ISBLK(mode):
        return (-1, rdev)
    return None


def _statx_key(path: str, buf: ctypes.Array[ctypes.c_char]) -> Key | None:
    """Identity of what ``path`` (a /proc fd link) points at. statx with AT_STATX_DONT_SYNC asks for type and
    inode only, so NFS and FUSE answer from their caches: os.stat would flush another process's dirty pages
    (NFS) or wait on a FUSE server, on every file every process has open."""
    if _STATX is None:
        st = os.stat(path)
        return _key(st.st_mode, st.st_dev, st.st_ino, st.st_rdev)
    if _STATX(AT_FDCWD, os.fsencode(path), AT_STATX_DONT_SYNC, STATX_TYPE | STATX_INO, buf) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)
    (mode,) = struct.unpack_from("=H", buf, 28)
    (ino,) = struct.unpack_from("=Q", buf, 32)
    rdev_major, rdev_minor, dev_major, dev_minor = struct.unpack_from("=IIII", buf, 128)
    return _key(mode, os.makedev(dev_major, dev_minor), ino, os.makedev(rdev_major, rdev_minor))


# ---- the /proc scan --------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _scan(keys: Collection[Key]) -> dict[Key, dict[int, list[FdInfo]]]:
    """key -> pid -> the fds (as FdInfo) through which that process has the file open. One listdir of each
    /proc/PID/fd, one statx per fd, fdinfo read only for matches; vanished processes and fds are skipped."""
    found: dict[Key, dict[int, list[FdInfo]]] = {}
    buf = ctypes.create_string_buffer(256)
    for pid in filter(str.isdigit, entries("/proc")):
        for fd in entries(f"/proc/{pid}/fd"):
            try:
                key = _statx_key(f"/proc/{pid}/fd/{fd}", buf)
            except OSError:
                continue
            if key is None or key not in keys:
                continue
            text = _read(f"/proc/{pid}/fdinfo/{fd}")
            if text is not None:
                found.setdefault(key, {}).setdefault(int(pid), []).append(parse_fdinfo(text))
    return found


# ---- the public calls ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    path: str
    key: Key
    probed: frozenset[int]


def _fd_target(path: str, fd: int) -> _Target:
    """The file open at ``fd`` (a caller's, opened as the caller, is never looked up by name again)."""
    st = os.fstat(fd)
    key = _key(st.st_mode, st.st_dev, st.st_ino, st.st_rdev)
    if key is None:
        raise InvalidImageError(f"{path} is not a regular file or a block device")
    return _Target(path, key, probe_lock_bytes(fd))


def _open_target(path: str, opened: Mapping[str, int]) -> _Target:
    if path in opened:
        return _fd_target(path, opened[path])
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidImageError(f"{real} is not a regular file or a block device")
        # O_NOFOLLOW: real has no symlinks left, so a symlink here was swapped in since: refuse it.
        # O_NONBLOCK: a FIFO swapped in since must not block the open.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidImageError(f"cannot open {real}: {exc.strerror}") from None
    try:
        return _fd_target(real, fd)
    finally:
        os.close(fd)


def _usage(target: _Target, seen: dict[int, list[FdInfo]], ignored: frozenset[int]) -> FileUsage:
    holders = []
    ignored_bytes: frozenset[int] = frozenset()
    for pid, infos in seen.items():
        lock_bytes = frozenset().union(*(i.lock_bytes for i in infos))
        if pid in ignored or not_yet_execed_child(pid):
            ignored_bytes |= lock_bytes
            continue
        program = program_name(pid)
        if program is None or not _still_open(pid, target.key):
            # Gone, or let go since the scan: a program of ours that was being started then held copies of our
            # descriptors, and its exec has closed them (its exe no longer tells it apart by now).
            ignored_bytes |= lock_bytes
            continue
        holders.append(Holder(pid, program, any(i.writable for i in infos), lock_bytes))
    holders.sort(key=lambda h: (not h.writer, h.pid))
    others = frozenset().union(*(h.lock_bytes for h in holders))
    lock_bytes = effective_lock_bytes(target.probed, others, ignored_bytes)
    state = decide_state(lock_bytes, holders)
    return FileUsage(target.path, state, bool(lock_bytes), tuple(holders), lock_bytes)


def _still_open(pid: int, key: Key) -> bool:
    """``pid`` has the file open now, not only when the scan looked."""
    buf = ctypes.create_string_buffer(256)
    for fd in entries(f"/proc/{pid}/fd"):
        try:
            if _statx_key(f"/proc/{pid}/fd/{fd}", buf) == key:
                return True
        except OSError:
            continue
    return False


def files_usage(paths: Sequence[str], *, ignore_pids: Collection[int] = (),
                opened: Mapping[str, int] | None = None) -> tuple[FileUsage, ...]:
    """:func:`file_usage` of several files with a single /proc scan, in the order given. ``opened``: the
    descriptors of those already open (by name), looked at instead of opening the names again."""
    targets = [_open_target(p, opened or {}) for p in paths]
    seen = _scan({t.key for t in targets})
    ignored = frozenset(ignore_pids) | {os.getpid()}
    return tuple(_usage(t, seen.get(t.key, {}), ignored) for t in targets)


def file_usage(path: str, *, ignore_pids: Collection[int] = (), fd: int | None = None) -> FileUsage:
    """Who has ``path`` (open at ``fd``, if given) open, and how. Raises NotFoundError, or InvalidImageError
    for what is not a regular file or block device. This process, and ``ignore_pids`` (with their locks),
    never count as users."""
    return files_usage([path], ignore_pids=ignore_pids, opened={path: fd} if fd is not None else None)[0]


def check_not_in_use(chain: Sequence[str], *, read_write: bool, ignore_pids: Collection[int] = (),
                     opened: Mapping[str, int] | None = None) -> None:
    """chain[0] is the top image, the rest its backing files. Raises ImageInUseError when any file is in use
    read-write, or when read_write is asked and the top image is in use at all. (Backing files are never
    opened writable by us, so a read-only user of a backing file does not block a read-write mount on top.)"""
    if not chain:
        return
    top, *backing = files_usage(chain, ignore_pids=ignore_pids, opened=opened)
    if top.state == READ_WRITE:
        raise ImageInUseError(f"image {top.path} is {top.describe()}: {_stop_hint(top)} first", top)
    if read_write and top.state == READ_ONLY:
        raise ImageInUseError(
            f"image {top.path} is {top.describe()}: {_stop_hint(top)} or mount read-only", top)
    for usage in backing:
        if usage.state == READ_WRITE:
            raise ImageInUseError(
                f"backing file {usage.path} of image {top.path} is {usage.describe()}: "
                f"{_stop_hint(usage)} first", usage)


def _stop_hint(usage: FileUsage) -> str:
    blamed = usage.blamed()
    if not blamed:
        return "stop the program that uses it"
    if all(h.program.startswith("qemu-system") for h in blamed):
        return "stop that VM" if len(blamed) == 1 else "stop those VMs"
    return "stop that process" if len(blamed) == 1 else "stop those processes"


def _join(names: list[str], most: int = 3) -> str:
    if len(names) > most:
        names = [*names[:most], f"{len(names) - most} more"]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

