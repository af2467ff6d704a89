"""What QEMU's programs (``qemu-img``, ``qemu-storage-daemon``, ``qemu-nbd``) said when they failed, told
apart by their words and worded as one sentence of the right error class (issue 9 #6: every start failure
used to be "in use", since QEMU's ``--blockdev`` prefix contains "lock").

The classes, each from QEMU's own messages (block.c, block/file-posix.c, block/qcow2.c, ...):

- a lock held by someone else ('Failed to get "write" lock'): :class:`~mountd.errors.InUseError`, which the
  layers word with the holder's name where they can find it (:mod:`mountd.host.qemulocks`);
- a file that is not there ("No such file or directory"): :class:`~mountd.errors.NotFoundError`;
- a file the process may not open ("Permission denied"): :class:`~mountd.errors.NotAuthorizedError`;
- a feature this QEMU does not have ("Unsupported qcow2 feature(s)", "... is not supported", "Unknown
  driver"): :class:`~mountd.errors.UnsupportedError`, which a newer QEMU may not raise;
- a damaged or foreign image ("Image is corrupt", "Image is not in qcow2 format", "Invalid ..."):
  :class:`~mountd.errors.InvalidImageError`;
- anything else: :class:`~mountd.errors.FailedError`, with QEMU's words.
"""

from __future__ import annotations

import re
from enum import StrEnum

from mountd.errors import (
    FailedError,
    InUseError,
    InvalidImageError,
    MountdError,
    NotAuthorizedError,
    NotFoundError,
    UnsupportedError,
)
from mountd.host.qemulocks import QEMU_LOCK_FAILURE


class QemuFailure(StrEnum):
    LOCK = "lock"
    MISSING = "missing"
    PERMISSION = "permission"
    UNSUPPORTED = "unsupported"
    IMAGE = "image"
    OTHER = "other"


#: The words of each class but LOCK, tried in order (a missing file's message also says "Could not open").
_WORDS: tuple[tuple[QemuFailure, re.Pattern[str]], ...] = (
    (QemuFailure.MISSING, re.compile(r"No such file or directory")),
    (QemuFailure.PERMISSION, re.compile(r"Permission denied|Operation not permitted")),
    (QemuFailure.UNSUPPORTED, re.compile(r"[Uu]nsupported|not supported|requires? a newer"
                                         r"|Unknown (driver|protocol|incompatible|format version)")),
    (QemuFailure.IMAGE, re.compile(r"corrupt|Image is not in|[Ii]nvalid|Could not open|not a valid|too large"
                                   r"|[Bb]ad (magic|header|signature)|must be|exceeds|out of range")),
)
#: What QEMU puts before its reason: the program, and the option that failed (``--blockdev OPTIONS: ``).
_PREFIXES = re.compile(r"^(qemu-img|qemu-storage-daemon|qemu-nbd): (--[a-z-]+ [^ ]*: )?")
#: QEMU's spelling of what it opened: ``'driver=qcow2,file.driver=file,file.filename=/x.qcow2'`` (or a
#: ``json:`` name). The file's name is all the user needs.
_OPTIONS = re.compile(r"'[^']*filename=([^,']*)[^']*'")


def classify(said: str) -> QemuFailure:
    """The class of a failure from what QEMU said (a lock conflict's words come before its last line,
    "Is another process using the image?")."""
    if QEMU_LOCK_FAILURE.search(said):
        return QemuFailure.LOCK
    return next((kind for kind, words in _WORDS if words.search(said)), QemuFailure.OTHER)


def last_words(stderr: str, names: dict[str, str] | None = None) -> str:
    """QEMU's reason on one line: its line that names a lock conflict, else its last line; without the
    program's prefix, its option strings cut to the file's name, and each of ``names`` (a ``/proc/self/fd/N``
    the user never typed) replaced by what it stands for."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    said = next((line for line in lines if QEMU_LOCK_FAILURE.search(line)), lines[-1] if lines else "")
    said = _OPTIONS.sub(r"'\1'", _PREFIXES.sub("", said)) or "no error output"
    for name, shown in (names or {}).items():
        said = said.replace(name, shown)
    return said


def qemu_error(said: str, image: str, *, doing: str = "open") -> MountdError:
    """One sentence of the error class of ``said`` (QEMU's last words, from :func:`last_words`) about
    ``image``. A lock conflict is worded without its holder: the layers that can name it do so first."""
    kind = classify(said)
    if kind == QemuFailure.LOCK:
        return InUseError(f"QEMU cannot lock {image}: another program uses it ({said})")
    if kind == QemuFailure.MISSING:
        return NotFoundError(f"QEMU cannot {doing} {image}: a file it needs is not there ({said})")
    if kind == QemuFailure.PERMISSION:
        return NotAuthorizedError(f"QEMU cannot {doing} {image}: {said}")
    if kind == QemuFailure.UNSUPPORTED:
        return UnsupportedError(f"QEMU cannot {doing} {image}: it does not support what the image uses "
                                f"({said}); a newer QEMU may")
    if kind == QemuFailure.IMAGE:
        return InvalidImageError(f"QEMU cannot {doing} {image}: {said}")
    return FailedError(f"QEMU could not {doing} {image}: {said}")
