"""A non-root caller's image served by a QEMU that runs as the caller (design: "The guarantee").

The QEMU that opens and parses the image, and follows whatever its headers name (backing files, data files,
extents), is a ``qemu-storage-daemon`` running with the caller's uid and groups, no capabilities and
``no_new_privs``. It gets the files the caller opened as ``/proc/self/fd/N`` and serves the image over NBD
on a listening socket that root made in a root-only directory and hands over as a descriptor
(``addr.type=fd``): the caller cannot put anything else at that path. Root's side (the kernel's nbd device,
or root's own ``qemu-storage-daemon`` FUSE export) is then only an NBD client of it; root's QEMU never opens
an image file, so a header rewritten after every check can only name files the caller could read anyway,
and an exploit of QEMU's image parsers gains nothing.

The server is ready when it answers the NBD handshake (it reaches its main loop only after opening every
block node); it fails by exiting, which resets our pending connection, and its stderr (a log file beside
the socket) says why. It outlives the daemon, like every server of a mount, and is stopped by the layer's
detach after the NBD client above it is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from mountd.errors import (
    FailedError,
    InvalidArgumentError,
    MountdError,
    OperationTimeoutError,
)
from mountd.host import command
from mountd.host.forked import report_output
from mountd.host.opener import Credentials, confined_argv
from mountd.host.processes import is_alive, proc_state, stop_process
from mountd.host.qemuerrors import QemuFailure, classify, last_words, qemu_error
from mountd.host.qemulocks import in_use_error
from mountd.host.qemusecret import secret_object
from mountd.image.nbdclient import NbdProtocolError, NbdReader
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec

log = logging.getLogger(__name__)

SERVER = "qemu-storage-daemon"
NODE_NAME = "disk"
READY_TIMEOUT = 60.0
LOG_TAIL = 400
#: The servers this process started, until stopped: each outlives the call that started it (and this process,
#: by design), and is reaped when stopped, so no zombie is left and no pid is ever waited for by number.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ServerSpec(Spec):
    kind: ClassVar[str] = "server"

    blockdev: str  # the pinned chain, files as /proc/self/fd/N
    socket: str  # where root's NBD client connects: in a root-only directory
    read_only: bool
    creds: Credentials
    image: str  # for messages: the image's name as the caller opened it
    key_fd: int = -1  # the memfd holding the key of an image QEMU encrypted, among the fds handed over

    def identity(self) -> dict[str, Any]:
        return {"blockdev": self.blockdev, "socket": self.socket, "read_only": self.read_only,
                "uid": self.creds.uid, "gids": list(self.creds.gids), "image": self.image,
                "key_fd": self.key_fd}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> ServerSpec:
        try:
            creds = Credentials(int(identity["uid"]), tuple(int(g) for g in identity["gids"]))
            spec = cls(str(identity["blockdev"]), str(identity["socket"]),
                       bool(identity.get("read_only", True)), creds, str(identity.get("image", "")),
                       int(identity.get("key_fd", -1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"bad server layer plan: {exc}") from None
        if spec.creds.uid == 0 or not os.path.isabs(spec.socket) or not spec.blockdev:
            raise InvalidArgumentError("a caller's server needs a non-root uid, an absolute socket path and "
                                       "a blockdev")
        return spec

    @property
    def log_path(self) -> str:
        return f"{self.socket}.log"

    def argv(self, listen_fd: int) -> list[str]:
        ro, rw = ("on", "off") if self.read_only else ("off", "on")
        return [*confined_argv(self.creds), SERVER, *secret_object(self.key_fd),
                "--blockdev", f"node-name={NODE_NAME},read-only={ro},{self.blockdev}",
                "--nbd-server", f"addr.type=fd,addr.str={listen_fd}",
                "--export", f"type=nbd,id=export,node-name={NODE_NAME},name=,writable={rw}"]


#: How long the caller's server is given to exit on SIGTERM before it is killed. Its only client, the layer
#: above (root's FUSE export, qemu-nbd), has flushed and gone before the server's turn comes, so it holds no
#: write of hers; and it runs as her uid, so she can stop it (SIGSTOP), which must not stall her unmount.
#: (Once in CI a server ignored SIGTERM for 60 s, main loop polling, cause not found.)
SERVER_GRACE = 10.0


def client_options(sock: str) -> str:
    """The QEMU block options with which root's side reads the caller's server."""
    return f"driver=nbd,server.type=unix,server.path={sock.replace(',', ',,')}"


@dataclass(frozen=True)
class Started:
    pid: int
    start_time: int
    size: int


def start(spec: ServerSpec, fds: Sequence[int], spawned: Callable[[int, int], None] = lambda p, s: None,
          ) -> Started:
    """Start the caller's server with ``fds`` inherited and wait until it serves (or say why it did not);
    ``spawned`` learns its pid and start time first, before anything else can fail."""
    listener = _listen(spec.socket)
    try:
        with open(spec.log_path, "wb") as errors:
            proc = subprocess.Popen(spec.argv(listener.fileno()), stdin=subprocess.DEVNULL, stdout=errors,
                                    stderr=errors, pass_fds=(*fds, listener.fileno()), env=command.BASE_ENV,
                                    cwd="/", start_new_session=True)
        _children[proc.pid] = proc
        _unprotect(proc.pid)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(spec.socket)  # queued on the listener, which the server shares
    finally:
        listener.close()  # from now on only the server holds it: if it exits, our connection is reset
    found = proc_state(proc.pid)
    started = found.start_time if found else 0
    try:
        spawned(proc.pid, started)
        size = _handshake(conn, spec)
    except NbdProtocolError:  # it exited (or never spoke NBD): say why, naming the image's holder if locked
        with contextlib.suppress(MountdError):
            stop(proc.pid, started, force=True)
        raise _start_error(spec, fds[0]) from None
    except MountdError:
        with contextlib.suppress(MountdError):
            stop(proc.pid, started, force=True)
        raise
    with contextlib.suppress(OSError):  # it serves: what it said (Debian's DMG modules) is for the log
        report_output(f"{SERVER} (pid {proc.pid}, as uid {spec.creds.uid})", Path(spec.log_path).read_text())
    return Started(proc.pid, started, size)


def _unprotect(pid: int) -> None:
    """The daemon's OOM protection (the unit's OOMScoreAdjust, inherited) is not for a process the caller
    controls: hers could otherwise hog memory while the OOM killer spares it for other users' processes."""
    with contextlib.suppress(OSError):  # gone already: its exit is reported by the handshake
        Path(f"/proc/{pid}/oom_score_adj").write_text("0")


def stop(pid: int, started: int, *, force: bool, grace: float | None = None) -> None:
    """Stop a server (ours or a previous daemon's) and, if it is our child, reap it."""
    stop_process(pid, started, SERVER, force=force, grace=grace)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait()


def remove_files(sock: str) -> None:
    for path in (sock, f"{sock}.log"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _listen(path: str) -> socket.socket:
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    if os.stat(parent).st_uid != 0 or os.stat(parent).st_mode & 0o077:
        raise FailedError(f"{parent} must be root's own directory (mode 0700) for the servers' sockets")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise FailedError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _handshake(conn: socket.socket, spec: ServerSpec) -> int:
    conn.settimeout(READY_TIMEOUT)
    try:
        reader = NbdReader(conn)
    except TimeoutError:
        conn.close()
        raise OperationTimeoutError(f"QEMU did not open {spec.image} within {READY_TIMEOUT:g} s") from None
    except (OSError, NbdProtocolError) as exc:
        conn.close()
        raise NbdProtocolError(str(exc)) from None
    size = reader.size
    reader.close()
    return size


def _start_error(spec: ServerSpec, top_fd: int) -> MountdError:
    """What the server said before it exited, as one sentence (``/proc/self/fd/N`` never shown)."""
    try:
        text = Path(spec.log_path).read_bytes()[-LOG_TAIL:].decode(errors="replace")
    except OSError:
        text = ""
    text = re.sub(r"/proc/self/fd/\d+", spec.image, text)
    last = last_words(text)
    if classify(last) == QemuFailure.LOCK:  # QEMU's image locks: someone else holds it
        return in_use_error(spec.image, read_only=spec.read_only, fd=top_fd)
    # Anything else (her header changed since it was checked, a feature this QEMU lacks): her QEMU's words.
    return qemu_error(last, spec.image, doing="serve")


class ServerLayer(Layer[tuple[int, int]]):
    """The caller's QEMU serving the image on ``socket``.

    Identity in: ``blockdev``, ``socket``, ``read_only``, ``uid``, ``gids``, ``image``; out: ``node`` (the
    socket), ``pid``, ``start_time``, ``size``. The descriptors of the caller's files come in memory
    (``fds``), never through the journal. Left behind on failure: nothing (the server is stopped, the socket
    and log removed).
    """

    kind = ServerSpec.kind

    def _attach(self, progress: Progress) -> LayerRecord:
        spec = ServerSpec.parse(self.identity)
        if not self.fds:
            raise InvalidArgumentError("the caller's server needs the caller's open files")
        self.record = replace(self.record, identity={**self.identity, "node": spec.socket})
        progress(self.record)

        def spawned(pid: int, started: int) -> None:
            self.record = replace(self.record, identity={**self.identity, "pid": pid, "start_time": started})
            progress(self.record)

        found = start(spec, self.fds, spawned)
        log.info("serving %s as uid %d on %s (%s pid %d)", spec.image, spec.creds.uid, spec.socket, SERVER,
                 found.pid)
        return replace(self.record, identity={
            **self.identity, "pid": found.pid, "start_time": found.start_time, "size": found.size})

    def verify(self) -> bool:
        return self.record.process is not None and is_alive(*self.record.process)

    def _present(self) -> tuple[int, int] | None:
        """The server's pid and start time, once they were recorded."""
        return self.record.process

    def _release(self, process: tuple[int, int], *, force: bool) -> None:
        """Stop it, killing it past :data:`SERVER_GRACE`: see there."""
        stop(*process, force=True, grace=SERVER_GRACE)

    def _clean_up(self) -> None:
        sock = str(self.identity.get("socket", ""))
        if sock:
            remove_files(sock)


@contextlib.contextmanager
def serving(blockdev: str, fds: Sequence[int], creds: Credentials, image: str,
            key_fd: int = -1) -> Iterator[NbdReader]:
    """A read-only server of the caller's for as long as the block runs (inspection), and a reader of it."""
    workdir = tempfile.mkdtemp(prefix="imgmount-serve-")
    spec = ServerSpec(blockdev, os.path.join(workdir, "sock"), True, creds, image, key_fd)
    try:
        found = start(spec, [*fds, *([key_fd] if key_fd >= 0 else [])])
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(spec.socket)
            reader = NbdReader(conn)
            try:
                yield reader
            finally:
                reader.close()
        finally:
            stop(found.pid, found.start_time, force=True)
    finally:
        remove_files(spec.socket)
        os.rmdir(workdir)
