"""What the engine takes and returns: plain data, importable without the engine (the commands talk to the
daemon with these and need none of the layers)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from mountd.errors import NotFoundError
from mountd.keys import NO_KEYS, Keys

BACKENDS = ("auto", "nbd", "loop", "fuse")


def display_name(text: str) -> str:
    """``text`` as valid UTF-8, for D-Bus and the terminal: a file name byte that is not UTF-8 (Python keeps
    it as a surrogate escape, U+DC80..U+DCFF) is shown as ``\\xNN``, any other lone surrogate as ``\\uNNNN``.

    For display only: D-Bus strings must be UTF-8, and a name read from the kernel (``readlink``) need not be.
    The engine and the journal keep the real name, which ``os.fsencode`` turns back into the file's bytes.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        return "".join(_displayed(c) for c in text)
    return text


def _displayed(c: str) -> str:
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:
        return f"\\x{n - 0xDC00:02x}"
    return f"\\u{n:04x}" if 0xD800 <= n <= 0xDFFF else c


@dataclass(frozen=True)
class MountRequest:
    image: str
    read_only: bool = True
    volumes: tuple[str, ...] = ()  # empty: every volume holding a mountable filesystem
    mount_root: str | None = None
    format: str | None = None
    snapshot: str | None = None
    backend: str = "auto"
    mount_options: tuple[str, ...] = ()
    owner: int = 0
    keys: Keys = field(default=NO_KEYS, repr=False, compare=False)  # never journaled, logged or shown


@dataclass(frozen=True)
class MountedVolume:
    name: str
    device: str
    filesystem: str
    mountpoint: str


class MountState(StrEnum):
    MOUNTING = "mounting"  # a Mount is under way (or was, when its process died)
    MOUNTED = "mounted"
    UNMOUNTING = "unmounting"
    BROKEN = "broken"  # a layer failed its check: only an unmount (which cleans up) helps


@dataclass(frozen=True)
class ImageMount:
    """What a mount is of and how: the part the journal's record and the API's view share."""

    id: str
    image: str
    format: str
    read_only: bool
    owner: int
    backend: str


@dataclass(frozen=True)
class MountInfo(ImageMount):
    """A mount as the API shows it."""

    device: str
    volumes: tuple[MountedVolume, ...]
    state: str
    image_id: str = ""  # "st_dev:st_ino" of the image file ("" from older versions)
    #: volume name -> what its mount does not show (e.g. a journal it could not replay read-only)
    notes: tuple[tuple[str, str], ...] = ()

    def holds(self, path: str) -> bool:
        """``path`` is one of this mount's mountpoints or inside one."""
        return any(path == v.mountpoint or path.startswith(v.mountpoint.rstrip("/") + "/")
                   for v in self.volumes if v.mountpoint)


def find_mount(mounts: Sequence[MountInfo], what: str) -> MountInfo:
    """The mount ``what`` names, in this order: its id; the image file that path names now (by device and
    inode, so a renamed image is still found); the path an image had when it was mounted; a mountpoint, or
    any path inside one."""
    try:
        st = os.stat(what)
        now = f"{st.st_dev}:{st.st_ino}"
    except (OSError, ValueError):
        now = "-"
    full, given = os.path.realpath(what), os.path.abspath(what)
    was = {full, given, display_name(full), display_name(given)}  # the daemon shows names as display_name
    tests: tuple[Callable[[MountInfo], bool], ...] = (
        lambda m: what == m.id, lambda m: now == m.image_id, lambda m: m.image in was,
        lambda m: m.holds(full))
    for test in tests:
        for m in mounts:
            if test(m):
                return m
    raise NotFoundError(f"{what} is not mounted by imgmount (imgmount --list shows what is)")
