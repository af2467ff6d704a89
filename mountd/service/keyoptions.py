"""The keys a Mount call carries: the option ``passphrases`` (a{ss}: a volume name, or ``image`` for QEMU's
encryption of the image, -> passphrase) and the option ``key-file`` (h: an open file of the caller's, whose
content is tried on every locked volume and on the image, as :attr:`mountd.keys.Keys.everywhere`).

The key file is read from the caller's descriptor only, never opened by name: what root reads is what the
caller could open. Reading is bounded in size (cryptsetup's default key-file limit, 8 MiB) and, for a pipe or
socket, in time; anything else that is not a regular file is refused (a terminal or a device could block or
never end). Errors name the cause, never a secret.
"""

from __future__ import annotations

import fcntl
import os
import select
import stat
import time
from collections.abc import Mapping, Sequence

from mountd.errors import InvalidArgumentError
from mountd.host.qemusecret import MAX_KEY_SIZE
from mountd.keys import Keys

#: Passphrases one call may name: far above the locked volumes of any real image.
MAX_PASSPHRASES = 256
#: How long a key file that is a pipe or socket may take to reach its end.
PIPE_TIMEOUT = 10.0
CHUNK = 1 << 16


def key_file_fd(options: Mapping[str, object], fds: Sequence[int]) -> int:
    """The descriptor the ``key-file`` option names (an index into the message's fds), or -1."""
    if "key-file" not in options:
        return -1
    index = options["key-file"]
    if not isinstance(index, int) or not 0 <= index < len(fds):
        raise InvalidArgumentError("option 'key-file' names no file descriptor sent with the call")
    return fds[index]


def keys_from(passphrases: Mapping[str, str], key_fd: int) -> Keys:
    """The :class:`Keys` of one call, its sizes and counts checked; the key file read from ``key_fd``."""
    if len(passphrases) > MAX_PASSPHRASES:
        raise InvalidArgumentError(f"at most {MAX_PASSPHRASES} passphrases per call")
    by_volume = {name: secret.encode() for name, secret in passphrases.items()}
    if any(not secret for secret in by_volume.values()):
        raise InvalidArgumentError("a passphrase is empty")
    if sum(len(s) for s in by_volume.values()) > MAX_KEY_SIZE:
        raise InvalidArgumentError(f"the passphrases hold more than {MAX_KEY_SIZE >> 20} MiB")
    return Keys(by_volume, read_key_file(key_fd) if key_fd >= 0 else None)


def read_key_file(fd: int) -> bytes:
    """The content of the caller's open key file, at most :data:`MAX_KEY_SIZE` bytes."""
    try:
        mode = os.fstat(fd).st_mode
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            raise InvalidArgumentError("the key file descriptor is not open for reading")
        if stat.S_ISREG(mode):
            data = _read_file(fd)
        elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            data = _read_stream(fd)
        else:
            raise InvalidArgumentError("the key file must be a regular file or a pipe")
    except OSError as exc:
        raise InvalidArgumentError(f"the key file cannot be read: {exc.strerror}") from None
    if not data:
        raise InvalidArgumentError("the key file is empty")
    return data


def _read_file(fd: int) -> bytes:
    data = bytearray()
    while len(data) <= MAX_KEY_SIZE:
        chunk = os.pread(fd, CHUNK, len(data))
        if not chunk:
            return bytes(data)
        data += chunk
    raise _too_large()


def _read_stream(fd: int) -> bytes:
    """A pipe's content to its end, waiting at most :data:`PIPE_TIMEOUT` for it (poll, then read what is
    there: the caller's descriptor is never switched to non-blocking under it)."""
    deadline = time.monotonic() + PIPE_TIMEOUT
    data = bytearray()
    while len(data) <= MAX_KEY_SIZE:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise InvalidArgumentError(f"the key file (a pipe) did not end within {PIPE_TIMEOUT:g} s")
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return bytes(data)
        data += chunk
    raise _too_large()


def _too_large() -> InvalidArgumentError:
    return InvalidArgumentError(f"the key file is larger than {MAX_KEY_SIZE >> 20} MiB (cryptsetup's "
                                "limit for a key file)")
