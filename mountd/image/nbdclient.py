"""Read any image QEMU understands, in user space: ``qemu-nbd`` on a private unix socket plus a small client.

No kernel nbd device, loop device or mount is involved, so this works on every host and is safe for untrusted
images. The server is started with ``--fork`` (its parent exits only once the socket listens: an event, not a
guess; judged by its pid file, :mod:`mountd.host.forked`) and without ``--persistent``, so it exits by itself
when our connection closes, even if we die.
Protocol: fixed newstyle handshake, ``NBD_OPT_GO``, simple replies (docs: NBD protocol specification).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator

from mountd.errors import CommandError, FailedError, InvalidImageError
from mountd.host.forked import run_forked
from mountd.host.processes import start_time, stop_process
from mountd.host.qemusecret import secret_object
from mountd.image.imageinfo import ImageInfo, block_options

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ = 0
CMD_DISC = 2
MAX_READ = 32 << 20  # qemu-nbd's limit per request
HANDSHAKE_TIMEOUT = 30.0
IO_TIMEOUT = 120.0


class NbdProtocolError(FailedError):
    pass


class NbdReader:
    """A :class:`~mountd.image.blockio.BlockReader` over an NBD connection."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._handle = 0
        self._size = _handshake(sock)
        sock.settimeout(IO_TIMEOUT)

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        if offset < 0:
            raise ValueError(f"bad read offset {offset}")
        chunks = []
        for start in range(offset, offset + length, MAX_READ):
            chunks.append(self._read_chunk(start, min(MAX_READ, offset + length - start)))
        return b"".join(chunks)

    def _read_chunk(self, offset: int, length: int) -> bytes:
        self._handle += 1
        self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self._handle, offset, length))
        magic, error, handle = struct.unpack(">IIQ", _recv(self._sock, 16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdProtocolError("the NBD server sent a malformed reply")
        if error:
            raise InvalidImageError(f"QEMU could not read {length} bytes at offset {offset}: "
                                    f"{os.strerror(error)} (is the image truncated or corrupt?)")
        return _recv(self._sock, length)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self._sock.close()


def _recv(sock: socket.socket, length: int) -> bytes:
    buf = bytearray()
    while len(buf) < length:
        chunk = sock.recv(min(length - len(buf), 1 << 20))
        if not chunk:
            raise NbdProtocolError("the NBD server closed the connection")
        buf += chunk
    return bytes(buf)


def _handshake(sock: socket.socket) -> int:
    """Negotiate the default export with NBD_OPT_GO and return its size in bytes."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    magic, opt_magic, _flags = struct.unpack(">8s8sH", _recv(sock, 18))
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise NbdProtocolError("the NBD server does not speak the newstyle protocol")
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    payload = struct.pack(">IH", 0, 0)  # empty export name, no extra info requests
    sock.sendall(IHAVEOPT + struct.pack(">II", OPT_GO, len(payload)) + payload)
    size = None
    for _ in range(64):  # a server sends a few INFO replies then ACK; bound it all the same
        rmagic, _opt, rtype, rlen = struct.unpack(">QIII", _recv(sock, 20))
        data = _recv(sock, rlen) if rlen <= 1 << 16 else b""
        if rmagic != OPT_REPLY_MAGIC or rlen > 1 << 16:
            raise NbdProtocolError("the NBD server sent a malformed option reply")
        if rtype & 0x80000000:
            raise NbdProtocolError(f"the NBD server refused the export: {data[4:].decode(errors='replace')}")
        if rtype == REP_INFO and len(data) >= 12 and struct.unpack_from(">H", data)[0] == INFO_EXPORT:
            size = struct.unpack_from(">Q", data, 2)[0]
        if rtype == REP_ACK:
            break
    if size is None:
        raise NbdProtocolError("the NBD server did not say how large the export is")
    return int(size)


@contextlib.contextmanager
def open_image(info: ImageInfo, key_fd: int = -1) -> Iterator[NbdReader]:
    """Serve ``info``'s chain read-only through a private ``qemu-nbd`` and yield a reader for it;
    ``key_fd``: the memfd holding the key of an image QEMU encrypted (:mod:`mountd.host.qemusecret`)."""
    workdir = tempfile.mkdtemp(prefix="imgmount-nbd-")
    sock_path, pid_path = os.path.join(workdir, "sock"), os.path.join(workdir, "pid")
    try:
        run_forked(["qemu-nbd", "--fork", "--read-only", "--socket", sock_path, "--pid-file", pid_path,
                    "--aio=threads", *secret_object(key_fd),
                    "--image-opts", block_options(info, force_share=True)],
                   pid_path, timeout=HANDSHAKE_TIMEOUT, pass_fds=(key_fd,) if key_fd >= 0 else ())
        reader = NbdReader(_connect(sock_path))
        try:
            yield reader
        finally:
            reader.close()
    except CommandError as exc:
        raise InvalidImageError(f"QEMU cannot serve {info.top.path}: {exc.stderr.strip()}") from None
    finally:
        _stop_leftover(pid_path, sock_path)
        shutil.rmtree(workdir, ignore_errors=True)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _stop_leftover(pid_path: str, sock_path: str) -> None:
    """A server that never saw our connection (we failed before connecting) would wait for ever: end it.

    The process is named by pid and start time, and checked to be ours (our socket path in its command
    line) before it is signalled, so a reused pid never is.
    """
    try:
        with open(pid_path) as f:
            pid = int(f.read().strip())
        started = start_time(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return
    if started is not None and sock_path.encode() in cmdline.split(b"\0"):
        stop_process(pid, started, "qemu-nbd", force=True)
