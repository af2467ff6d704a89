"""Open a caller's files as the caller, once, and keep only the descriptors (design: "The guarantee").

A check by path followed by a second open of the same name is not a check: between the two, the caller can
swap the file, or a directory on its path, for a symlink to something only root may read. So for a non-root
caller every file of an image (the image, its backing files, data files and extents) is opened by a child
process that runs with the caller's uid, gid and groups, no capabilities and ``no_new_privs`` (kept a while
for her next call: it holds nothing between requests, and all it answers is checked); it sends each
descriptor back over a unix socket (``SCM_RIGHTS``); the name is what the kernel calls the file that
descriptor holds. From then on the daemon uses those descriptors, never the names; QEMU gets them as
``/proc/self/fd/N`` and runs as the caller too (:func:`confined_argv`), so a header rewritten after any
check can only name what the caller could open itself.

Each file is opened in two steps: ``O_PATH`` first (which opens nothing: no FIFO blocks, no device driver
runs), then, only if ``fstat`` says it is a regular file, a real open through ``/proc/self/fd`` with
``O_NONBLOCK``, so a lease the caller holds on her own file answers at once instead of stalling the daemon
for ``lease-break-time``. Root (uid 0) opens the same way in-process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from mountd.errors import (
    FailedError,
    InUseError,
    InvalidArgumentError,
    NotAuthorizedError,
    NotFoundError,
    OperationTimeoutError,
    echo,
)

PATH_MAX = 4096
OPEN_TIMEOUT = 20.0
IDLE_SECONDS = 30.0  # an opener child kept for the same caller's next call
MAX_IDLE = 16  # idle opener children kept, all callers together
#: Names no image may refer to: the kernel's own files. Opening them as the caller could still describe the
#: opener process (its pid, its fds), which is nobody's business.
KERNEL_TREES = ("/proc/", "/sys/", "/dev/")
# The opener runs as the caller, so its interpreter must be one every user may execute: the system's (a
# virtualenv's may sit in a directory only root can enter), else ours.
OPENER_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

# Runs as the caller: one request per datagram ("r" or "w", NUL, path); one answer per request: "K" with the
# fd attached, or "E" NUL errno. Ends when the daemon closes its end.
# _socket, not socket: the child starts in ~12 ms instead of ~17 (socket.py imports enum and selectors).
_CHILD = r"""
import _socket, os, stat, sys
s = _socket.socket(fileno=0)
while True:
    req = s.recv(8192)
    if not req:
        break
    mode, _, path = req.partition(b"\0")
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            bits = os.fstat(pfd).st_mode
            if not stat.S_ISREG(bits):
                raise OSError(21 if stat.S_ISDIR(bits) else 0, "")
            flags = (os.O_RDWR if mode == b"w" else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            fd = os.open(f"/proc/self/fd/{pfd}", flags)
        finally:
            os.close(pfd)
    except OSError as exc:
        s.send(b"E\0%d" % exc.errno)
        continue
    s.sendmsg([b"K"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])
    os.close(fd)
"""


@dataclass(frozen=True)
class Credentials:
    """Who a confined process runs as: the caller's uid and groups, as the bus reported them."""

    uid: int
    gids: tuple[int, ...]  # primary group first

    @property
    def gid(self) -> int:
        return self.gids[0] if self.gids else self.uid


def confined_argv(creds: Credentials) -> list[str]:
    """The prefix that runs a program as ``creds``: no capabilities, no way to gain privileges."""
    groups = ["--groups=" + ",".join(map(str, creds.gids))] if creds.gids else ["--clear-groups"]
    return ["setpriv", f"--reuid={creds.uid}", f"--regid={creds.gid}", *groups, "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--"]


@dataclass(frozen=True)
class OpenedFile:
    """A file opened by (or for) the caller: the descriptor, and what the kernel calls the file."""

    fd: int
    name: str
    writable: bool
    dev: int
    ino: int

    @property
    def proc_path(self) -> str:
        return fd_path(self.fd)


def fd_path(fd: int) -> str:
    """The name that opens the very file open at ``fd`` in a process that inherited it at that number."""
    return f"/proc/self/fd/{fd}"


def check_path(path: str, what: str = "the image path") -> None:
    """Reject what no open could sensibly take, before anything is opened."""
    if not path or "\0" in path or "\n" in path:
        raise InvalidArgumentError(f"{what} is empty or contains a newline or NUL")
    if len(os.fsencode(path)) >= PATH_MAX:
        raise InvalidArgumentError(f"{what} is longer than PATH_MAX ({PATH_MAX} bytes)")
    if not os.path.isabs(path):
        raise InvalidArgumentError(f"{what} must be absolute")


def in_kernel_tree(path: str) -> bool:
    return path.startswith(KERNEL_TREES) or path in ("/proc", "/sys", "/dev")


@dataclass
class Opener:
    """Opens files as ``creds`` (None: as this process, root) and owns every descriptor it hands out until
    :meth:`close`. Use as a context manager."""

    creds: Credentials | None = None
    files: list[OpenedFile] = field(default_factory=list)
    _child: _Child | None = None

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self, path: str, *, write: bool, what: str = "image") -> OpenedFile:
        """Open ``path`` (absolute) read-only or read-write; raise a clear error the caller may see."""
        check_path(path, f"the {what} path")
        fd = self._open_as_caller(path, write, what) if self.creds is not None else \
            self._open_here(path, write, what)
        try:
            opened = _checked(fd, path, write)
        except BaseException:
            os.close(fd)
            raise
        self.files.append(opened)
        return opened

    def by_name(self) -> dict[str, int]:
        """The descriptors handed out, by the name of the file each holds."""
        return {f.name: f.fd for f in self.files}

    def close(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self.files.clear()
        if self._child is not None and self.creds is not None:
            POOL.give(self.creds, self._child)
        self._child = None

    # --- as root, in-process ------------------------------------------------------------------------------

    @staticmethod
    def _open_here(path: str, write: bool, what: str) -> int:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(path, exc.errno or errno.EIO, write, what) from None
        try:
            mode = os.fstat(pfd).st_mode
            if not stat.S_ISREG(mode):
                raise _open_error(path, errno.EISDIR if stat.S_ISDIR(mode) else 0, write, what)
            flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            fd = os.open(fd_path(pfd), flags)
        except OSError as exc:
            raise _open_error(path, exc.errno or errno.EIO, write, what) from None
        finally:
            os.close(pfd)
        return fd

    # --- as the caller, in a child ------------------------------------------------------------------------

    def _open_as_caller(self, path: str, write: bool, what: str) -> int:
        assert self.creds is not None
        request = (b"w" if write else b"r") + b"\0" + os.fsencode(path)
        child = self._child = self._child or POOL.take(self.creds)
        try:
            answer = child.ask(request)
            if answer is None and child.served:  # a child kept from before has gone (she may kill hers)
                child.stop()
                child = self._child = _Child.start(self.creds)
                answer = child.ask(request)
        except OperationTimeoutError:  # stopped or stuck (she may SIGSTOP hers): never used again
            self._child = None
            child.stop(kill=True)
            raise
        if answer is None:
            self._child = None
            child.stop()
            raise FailedError(f"the opener process running as the caller gave no answer ({child.error()})")
        status, _, value = answer[0].partition(b"\0")
        if status == b"K" and len(answer[1]) == 1:
            return answer[1][0]
        for fd in answer[1]:
            os.close(fd)
        if status == b"E" and value.isdigit():
            raise _open_error(path, int(value), write, what)
        raise FailedError(f"the opener process running as the caller answered {answer[0][:40]!r}")


@dataclass
class _Child:
    """An opener process running as a caller, and our end of its socket."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    idle_since: float = 0.0
    served: int = 0  # requests answered

    @classmethod
    def start(cls, creds: Credentials) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [*confined_argv(creds), OPENER_PYTHON, "-I", "-S", "-c", _CHILD],
                stdin=theirs.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={}, cwd="/")
        except OSError as exc:
            ours.close()
            raise FailedError(f"cannot start the opener process: {exc.strerror}") from None
        finally:
            theirs.close()
        ours.settimeout(OPEN_TIMEOUT)
        return cls(proc, ours)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, request: bytes) -> tuple[bytes, list[int]] | None:
        """The answer to one request, or None if the child has gone."""
        try:
            self.sock.send(request)
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, PATH_MAX + 16, 1)
        except TimeoutError:
            raise OperationTimeoutError(f"opening a file as the caller took over {OPEN_TIMEOUT:g} s") \
                from None
        except OSError:
            return None
        if not msg and not fds:
            return None
        self.served += 1
        return msg, fds

    def stop(self, *, kill: bool = False) -> None:
        """Close our end (it exits on that, unless ``kill``: it is stuck) and reap it."""
        self.sock.close()
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=OPEN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def error(self) -> str:
        if self.alive() or self.proc.stderr is None:
            return "no error output"
        return self.proc.stderr.read().decode(errors="replace").strip()[-200:] or "no error output"


class _Pool:
    """Idle opener children by credentials, kept for IDLE_SECONDS: starting one costs ~12 ms of a call's
    ~50. A child is one caller's alone (her uid and groups), holds nothing between requests, and exits when
    we close our end, so none outlives the daemon."""

    def __init__(self) -> None:
        self._idle: list[tuple[Credentials, _Child]] = []
        self._lock = threading.Lock()

    def take(self, creds: Credentials) -> _Child:
        with self._lock:
            stale = self._expire()
            found = next((i for i, (c, child) in enumerate(self._idle) if c == creds and child.alive()), None)
            child = self._idle.pop(found)[1] if found is not None else None
        for old in stale:
            old.stop()
        return child or _Child.start(creds)

    def give(self, creds: Credentials, child: _Child) -> None:
        if not child.alive():
            child.stop()
            return
        child.idle_since = time.monotonic()
        with self._lock:
            self._idle.append((creds, child))
            extra = self._idle[:-MAX_IDLE] if len(self._idle) > MAX_IDLE else []
            del self._idle[:len(extra)]
        for _, old in extra:
            old.stop()

    def _expire(self) -> list[_Child]:
        """Drop (and return, to be stopped outside the lock) children idle too long or gone."""
        now = time.monotonic()
        fresh = [(c, child) for c, child in self._idle
                 if now - child.idle_since <= IDLE_SECONDS and child.alive()]
        stale = [child for _, child in self._idle if all(child is not kept for _, kept in fresh)]
        self._idle = fresh
        return stale


POOL = _Pool()


def _checked(fd: int, path: str, write: bool) -> OpenedFile:
    """What the kernel says of a descriptor, not what the child said: the caller may run her opener under a
    debugger, so its answer is only ever a descriptor she could have had, checked here like any input."""
    st = os.fstat(fd)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not stat.S_ISREG(st.st_mode) or (write and flags & os.O_ACCMODE != os.O_RDWR):
        raise InvalidArgumentError(f"{path} did not open as a regular file{' for writing' if write else ''}")
    # O_NONBLOCK has done its work (no wait on a lease or a FIFO); reads and writes must block again.
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return OpenedFile(fd, os.readlink(fd_path(fd)), write, st.st_dev, st.st_ino)


def _open_error(path: str, err: int, write: bool, what: str) -> Exception:
    """One sentence the caller may see: it only says what the caller's own open said."""
    how = "writing" if write else "reading"
    path = echo(path)
    if err == errno.EISDIR:
        return InvalidArgumentError(f"{path} is a directory, not a disk image")
    if err == 0:
        return InvalidArgumentError(f"{path} is not a regular file: only image files can be mounted")
    if err == errno.ENOENT:
        return NotFoundError(f"no such {what}: {path}")
    if err in (errno.EACCES, errno.EPERM, errno.EROFS):
        return NotAuthorizedError(f"you cannot open {path} for {how} ({os.strerror(err)}): imgmount mounts "
                                  "only what you can open yourself")
    if err == errno.EWOULDBLOCK:
        return InUseError(f"{path} is in use: a program holds a lease on it; try again once it lets go")
    return InvalidArgumentError(f"cannot open {path} for {how}: {os.strerror(err)}")
