"""Taking QEMU's image locks as a QEMU user of the image would, and naming whoever holds them.

QEMU locks byte ``100+n`` ("holds permission n") and ``200+n`` ("does not share permission n") of every
image it opens; :mod:`mountd.host.holders` reads them, this module takes them and words the refusal.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re

from mountd.errors import FailedError
from mountd.host.holders import (
    F_OFD_GETLK,
    FREE,
    READ_ONLY,
    Flock,
    ImageInUseError,
    file_usage,
    pack_flock,
    unpack_flock,
)
from mountd.host.loopdev import loops_backed_by

F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)

#: QEMU lock bytes (100+n holds permission n, 200+n does not share it; n: 0 read, 1 write, 3 resize): what we
#: hold, and the bytes whose lock by anyone else conflicts with that (QEMU's raw_check_lock_bytes).
HELD = {True: (100, 201, 203), False: (100, 101, 103, 201, 203)}  # by read_only
CONFLICTS = {True: (200, 101, 103), False: (200, 201, 203, 101, 103)}

#: QEMU's words for an image lock held by someone else ('Failed to get "write" lock', 'Failed to get shared
#: "write" lock'); not just "lock", which every ``--blockdev`` option in QEMU's error prefix contains.
QEMU_LOCK_FAILURE = re.compile(r'Failed to get (shared )?"[a-z -]+" lock')


def take_qemu_locks(fd: int, *, read_only: bool) -> bool:
    """Lock ``fd`` as a QEMU user of the image would; False if another user's locks conflict. Like QEMU,
    lock first and check after, so of two users starting at once at least one sees the other."""
    try:
        for byte in HELD[read_only]:
            fcntl.fcntl(fd, F_OFD_SETLK, pack_flock(Flock(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0)))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):  # a write lock: not QEMU's, but a user all the same
            return False
        raise FailedError(f"cannot take QEMU's image locks: {exc.strerror}") from None
    for byte in CONFLICTS[read_only]:
        query = pack_flock(Flock(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        if unpack_flock(fcntl.fcntl(fd, F_OFD_GETLK, query)).l_type != fcntl.F_UNLCK:
            return False
    return True


def in_use_error(path: str, *, read_only: bool, fd: int | None = None) -> ImageInUseError:
    """Name whoever holds ``path`` (open at ``fd``, if given; call with our own locks released, so only
    theirs count)."""
    usage = file_usage(path, fd=fd)
    loops = loops_backed_by(path)
    who = usage.describe() if usage.state != FREE else "locked by a program that has let go since: try again"
    if loops and not usage.blamed():
        who += f" (held through loop device {', '.join(loops)})"
    hint = "stop it or mount read-only" if not read_only and usage.state == READ_ONLY else "stop it first"
    return ImageInUseError(f"image {path} is {who}: {hint}", usage)
