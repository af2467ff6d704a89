"""Windows volumes: an NTFS volume that Windows left hibernated or dirty mounts read-only only.

Read-write is refused with an error, not turned into a read-only mount: the caller asked to write, and a
mount that silently cannot (what ntfs-3g itself does: "Falling back to read-only mount") fails later, at some
write, far from the cause. Writing to such a volume is what must not happen: a hibernated Windows (or one
shut down with Fast Startup) restores its cached view of the volume at its next boot, so whatever was
written meanwhile is lost or corrupts the volume; a dirty volume awaits chkdsk. A read-only mount shows it as
it is, with a note that says why read-write is refused.
"""

from __future__ import annotations

import os

from mountd.errors import InvalidArgumentError
from mountd.image import ntfs
from mountd.image.blockio import BlockReader, FileReader

NTFS_TYPES = ("ntfs", "ntfs3")


def ntfs_note(volume: str, node: str, fstype: str, *, read_only: bool) -> str:
    """The note of a read-only mount of ``volume`` (on block device ``node``) that Windows left unsafe to
    write, or ""; a read-write mount of it raises InvalidArgumentError."""
    if fstype not in NTFS_TYPES:
        return ""
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        why = _why(ntfs.state(FileReader(fd)))
    finally:
        os.close(fd)
    if not why:
        return ""
    if not read_only:
        raise InvalidArgumentError(
            f"volume {volume} cannot be mounted read-write (mount it read-only): {why}")
    return f"read-write is refused: {why}"


def info_note(fstype: str, reader: BlockReader) -> str:
    """What ``--info`` says of an NTFS volume that Windows left unsafe to write ("" for any other)."""
    if fstype not in NTFS_TYPES:
        return ""
    found = ntfs.state(reader)
    what = "hibernated Windows (or Fast Startup)" if found.hibernated else "dirty" if found.dirty else ""
    return f"{what}: mounts read-only only" if what else ""


def _why(found: ntfs.NtfsState) -> str:
    if found.hibernated:
        return ("Windows on it is hibernated or was shut down with Fast Startup (hiberfil.sys holds its "
                "session), and writes made now are lost or corrupt the volume when it resumes: start Windows "
                "and shut it down fully (Shift + Shut down, or turn Fast Startup off)")
    if found.dirty:
        return ("its dirty flag is set (Windows did not shut down cleanly, or asked for a disk check): run "
                "chkdsk on it in Windows first")
    return ""
