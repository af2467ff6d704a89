"""Private mount roots: ``/run/media/<user>`` that only its user (and root) can enter.

Why: the directory we make for each volume is 0700, but once a filesystem is mounted on it, what other users
see is the mounted filesystem's own root directory, usually 0755. A mount root that is world-searchable would
let every local user, ``nobody`` included, read the files of every mounted image. So, like udisks, the root is
``root:root 0750`` with a POSIX access ACL that lets its user (only) search and list it. Root stays its owner,
so a user can neither swap nor rename what is in it (:func:`mountd.layers.mount._check_safe_parent` still
holds).

Every step works on descriptors reached one path component at a time with ``O_NOFOLLOW``, so a symlink
swapped in by someone else cannot redirect a chown or an ACL. Nothing is written that is already right,
so a second call changes nothing. Where the filesystem lacks POSIX ACLs we stop with an error; the
directory is left root-only (closed), never opened up to everyone as a fallback.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
import struct

from mountd.errors import FailedError, InvalidArgumentError, MountdError, UnsupportedError

log = logging.getLogger(__name__)

ROOT_MODE = 0o750
PARENT_MODE = 0o755
ACCESS_ACL = "system.posix_acl_access"
DEFAULT_ACL = "system.posix_acl_default"
ACL_VERSION = 2  # POSIX_ACL_XATTR_VERSION
UNDEFINED_ID = 0xFFFFFFFF  # ACL_UNDEFINED_ID: the id of entries that name no one
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
R, W, X = 4, 2, 1
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NO_ACL_ERRNOS = (errno.EOPNOTSUPP, errno.ENOTSUP)


def acl_blob(owner: int) -> bytes:
    """The ``system.posix_acl_access`` value (the kernel's little-endian format) of a mount root for uid
    ``owner``: owner rwx (root), ``owner`` r-x, group r-x, mask r-x, others nothing. For root itself, just
    the three entries that mean plain mode 0750."""
    if not 0 <= owner < UNDEFINED_ID:
        raise InvalidArgumentError(f"{owner} is not a valid uid")
    entries = [(USER_OBJ, R | W | X, UNDEFINED_ID)]
    if owner != 0:
        entries.append((USER, R | X, owner))
    entries.append((GROUP_OBJ, R | X, UNDEFINED_ID))
    if owner != 0:
        entries.append((MASK, R | X, UNDEFINED_ID))
    entries.append((OTHER, 0, UNDEFINED_ID))
    return struct.pack("<I", ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in sorted(entries))


def ensure_private_root(root: str, owner: int) -> None:
    """Make ``root`` (e.g. ``/run/media/alice``) a directory only uid ``owner`` and root can enter:
    ``root:root 0750`` plus an access ACL ``user:owner:r-x``. Missing parents are created root-owned 0755.
    An existing root-owned directory (an older version made them 0755) is fixed; anything else in the way
    (a symlink, a file, a directory someone else owns, a parent others can change) is refused."""
    if _ensure(root, owner):
        log.info("made the mount root %s private to uid %d", root, owner)


def fix_existing_roots(base: str) -> list[str]:
    """Make every root-owned directory directly under ``base`` that is named after a user (or a uid)
    private to that user. Returns the ones that changed; anything else is skipped with a warning."""
    try:
        names = sorted(os.listdir(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    fixed = []
    for name in names:
        path = os.path.join(base, name)
        owner = _uid_of(name)
        if owner is None:
            log.warning("left %s as it is: %s is not a user name or uid", path, name)
        elif _is_root_dir(path) and _fix(path, owner):
            fixed.append(path)
    return fixed


# ---- the walk --------------------------------------------------------------------------------------------


def _ensure(root: str, owner: int) -> bool:
    """:func:`ensure_private_root`; True if anything changed."""
    blob = acl_blob(owner)
    if not os.path.isabs(root) or os.path.normpath(root) != root or root == "/":
        raise InvalidArgumentError(f"the mount root {root!r} is not a normalised absolute path")
    try:
        parent = _open_parent(root)
        try:
            fd, created = _open_child(parent, os.path.basename(root), root, ROOT_MODE & 0o700)
        finally:
            os.close(parent)
        try:
            return _make_private(fd, root, owner, blob) or created
        finally:
            os.close(fd)
    except OSError as exc:
        raise FailedError(f"cannot make the mount root {root} private: {exc.strerror or exc}") from None


def _open_parent(root: str) -> int:
    """A descriptor of ``root``'s parent, reached from ``/`` without following symlinks; each component is
    created (root-owned 0755) if missing and must be a directory only root can change."""
    fd = os.open("/", OPEN_DIR)
    try:
        for part in os.path.dirname(root).split("/")[1:]:
            if part:
                child, created = _open_child(fd, part, root, PARENT_MODE)
                os.close(fd)
                fd = child
                _check_only_root_changes(fd, root)
                if created:
                    os.fchmod(fd, PARENT_MODE)  # whatever the umask: users must be able to pass through
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child(dir_fd: int, name: str, root: str, mode: int) -> tuple[int, bool]:
    """Open (creating it first if missing) the directory ``name`` in ``dir_fd``; True if we made it."""
    created = True
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        created = False
    try:
        return os.open(name, OPEN_DIR, dir_fd=dir_fd), created
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise InvalidArgumentError(f"{name} (in the mount root path {root}) is a symlink or not a "
                                   "directory: remove it or choose another mount root") from None


def _check_only_root_changes(fd: int, root: str) -> None:
    """The rule of :func:`mountd.layers.mount._check_safe_parent`, on a descriptor."""
    st = os.fstat(fd)
    sticky = bool(st.st_mode & stat.S_ISVTX)
    group_writable = bool(st.st_mode & stat.S_IWGRP) and st.st_gid != 0
    if st.st_uid != 0 or ((st.st_mode & stat.S_IWOTH or group_writable) and not sticky):
        raise InvalidArgumentError(f"a directory on the way to the mount root {root} can be changed by users "
                                   "other than root: choose a mount root that only root can write")


# ---- the root itself -------------------------------------------------------------------------------------


def _make_private(fd: int, root: str, owner: int, blob: bytes) -> bool:
    """Closed first (root:root 0750), then opened to ``owner`` by the ACL; True if anything changed."""
    st = os.fstat(fd)
    if st.st_uid != 0:
        raise InvalidArgumentError(f"the mount root {root} is not owned by root: remove it or choose "
                                   "another mount root")
    changed = st.st_gid != 0 or stat.S_IMODE(st.st_mode) != ROOT_MODE
    if st.st_gid != 0:
        os.fchown(fd, 0, 0)
    if stat.S_IMODE(st.st_mode) != ROOT_MODE:
        os.fchmod(fd, ROOT_MODE)
    changed |= _drop_acl(fd, DEFAULT_ACL)
    changed |= _drop_acl(fd, ACCESS_ACL) if owner == 0 else _set_acl(fd, root, blob)
    if stat.S_IMODE(os.fstat(fd).st_mode) != ROOT_MODE:  # dropping an ACL leaves its mask as group bits
        os.fchmod(fd, ROOT_MODE)
    return changed


def _read_acl(fd: int, name: str) -> bytes | None:
    """The ACL xattr, None if there is none (or the filesystem has no ACLs at all)."""
    try:
        return os.getxattr(fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, *NO_ACL_ERRNOS):
            return None
        raise


def _drop_acl(fd: int, name: str) -> bool:
    if _read_acl(fd, name) is None:
        return False
    os.removexattr(fd, name)
    return True


def _set_acl(fd: int, root: str, blob: bytes) -> bool:
    if _read_acl(fd, ACCESS_ACL) == blob:
        return False
    try:
        os.setxattr(fd, ACCESS_ACL, blob)
    except OSError as exc:
        if exc.errno not in NO_ACL_ERRNOS:
            raise
        raise UnsupportedError(f"the filesystem of the mount root {root} lacks POSIX ACLs, so its user "
                               "cannot be let in alone: mount it with the acl option (e.g. /run), or "
                               "choose another mount root") from None
    return True


# ---- start-up --------------------------------------------------------------------------------------------


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        pass
    if name.isascii() and name.isdigit() and int(name) < UNDEFINED_ID:
        return int(name)
    return None


def _is_root_dir(path: str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        log.warning("left %s as it is: not a directory", path)
    elif st.st_uid != 0:
        log.warning("left %s as it is: owned by uid %d, not root", path, st.st_uid)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0


def _fix(path: str, owner: int) -> bool:
    try:
        changed = _ensure(path, owner)
    except MountdError as exc:
        log.warning("could not make the mount root %s private: %s", path, exc)
        return False
    if changed:
        log.warning("fixed the mount root %s: now root:root 0750, entered only by uid %d", path, owner)
    return changed
