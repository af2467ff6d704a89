"""Handing a passphrase to QEMU: a secret object read from a descriptor, never from an argument.

QEMU takes keys as ``--object secret,id=ID,file=PATH``; ``data=`` would put the secret in the command line,
which every user reads in ``/proc/PID/cmdline``. PATH is ``/proc/self/fd/N`` of a memfd that holds the
passphrase: an anonymous file with no name in any directory, inherited by the QEMU process at N and freed
with its last descriptor, so nothing is left on disk however we or QEMU end. QEMU reads it once, when it
creates the secret object at start-up; once that process has started, the memfd is emptied, so the
descriptor a long-running server keeps (QEMU does not close what it inherits) holds nothing. A server
that outlives us keeps the key in its memory only, and the journal only records
that the image needs one (:data:`SECRET_ID` in its block options), so a restarted daemon verifies and tears
down such a mount without the secret.

Every program that opens an encrypted image (``qemu-nbd``, ``qemu-storage-daemon``, ``qemu-io``) gets the
same object id; :func:`is_wrong_key` recognises QEMU's word for a passphrase that opens no key slot.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from mountd.errors import InvalidArgumentError

#: The id by which block options name the key (``encrypt.key-secret=`` of qcow2, ``key-secret=`` of luks).
SECRET_ID = "imgmount-key"
#: What QEMU's LUKS code says of a passphrase that unlocks no key slot (crypto/block-luks.c).
WRONG_KEY = "Invalid password, cannot unlock any keyslot"
#: A passphrase, or a key file's content: cryptsetup's own limit for a key file (8 MiB).
MAX_KEY_SIZE = 8 << 20


@contextlib.contextmanager
def secret_fd(secret: bytes) -> Iterator[int]:
    """A memfd holding ``secret``, at the descriptor yielded (close-on-exec: pass it on explicitly), for
    programs started within the block: it is emptied when the block ends."""
    if len(secret) > MAX_KEY_SIZE:
        raise InvalidArgumentError(f"a passphrase or key file may hold at most {MAX_KEY_SIZE >> 20} MiB")
    fd = os.memfd_create("imgmount-key", os.MFD_CLOEXEC)
    try:
        view = memoryview(secret)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.ftruncate(fd, 0)  # the same file in every process that inherited it: emptied for all of them
        os.close(fd)


def secret_object(fd: int) -> list[str]:
    """The QEMU arguments that define :data:`SECRET_ID` from the memfd at ``fd`` (none for ``fd < 0``)."""
    return ["--object", f"secret,id={SECRET_ID},file=/proc/self/fd/{fd}"] if fd >= 0 else []


def is_wrong_key(message: str) -> bool:
    return WRONG_KEY in message
