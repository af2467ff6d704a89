"""The top layer of a stack: a filesystem mounted on a directory of its own (design: "Filesystems").

Also mountpoint naming.
Options come from :func:`mountd.host.filesystems.mount_options`; this module only runs them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from mountd.errors import (
    BusyError,
    CommandError,
    FailedError,
    InvalidArgumentError,
    InvalidImageError,
    MountdError,
    NotFoundError,
)
from mountd.host import command, filesystems, fusedrivers
from mountd.host.fusedrivers import FuseDriver
from mountd.host.mountinfo import MountEntry, mounted_at, mountinfo
from mountd.host.processes import is_alive, text_of
from mountd.host.users import SYS_CLASS_BLOCK, kernel_users_under, mountpoint_users
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec

log = logging.getLogger(__name__)

MAX_SUFFIX = 1000
MAX_NAME_RACES = 16  # names tried when other mounts keep taking the one we chose first
MAX_NAME_BYTES = 200
MOUNT_TIMEOUT = 120.0
FSCK = {"ext2": "e2fsck -n", "ext3": "e2fsck -n", "ext4": "e2fsck -n", "xfs": "xfs_repair -n",
        "btrfs": "btrfs check --readonly", "vfat": "fsck.vfat -n", "exfat": "fsck.exfat -n"}


# ---- mountpoint names ------------------------------------------------------------------------------------


def sanitise_name(name: str) -> str:
    """A single printable path component: no "/", no leading dots, at most 200 bytes (UTF-8)."""
    clean = "".join(c if c.isprintable() and c != "/" else "_" for c in name).lstrip(".").strip()
    data = clean.encode("utf-8", errors="replace")[:MAX_NAME_BYTES]
    clean = data.decode("utf-8", errors="ignore").strip()  # a cut multi-byte character is dropped
    return clean or "volume"


def unique_mountpoint(root: str, name: str) -> str:
    """``root/name``, or ``root/name-2``, ``-3`` ... when taken (up to ``-1000``); ``name`` sanitised."""
    if not os.path.isabs(root):
        raise InvalidArgumentError(f"the mount root {root!r} is not an absolute path")
    base = sanitise_name(name)
    root = os.path.normpath(root)
    for n in range(1, MAX_SUFFIX + 1):
        candidate = os.path.join(root, base if n == 1 else f"{base}-{n}")
        if not os.path.lexists(candidate):
            return candidate
    raise FailedError(f"every name from {base} to {base}-{MAX_SUFFIX} under {root} is taken: clean up {root}")


# ---- the layer -------------------------------------------------------------------------------------------


def _syncfs(path: str) -> None:
    """Write the filesystem's dirty data to its device: umount does too, but a lazy unmount leaves the
    filesystem alive, and the layers below must not be detached with writes still in memory.

    In a program of its own (``sync --file-system``, syncfs(2)): a descriptor of ours on the filesystem
    would be copied into any program another thread starts meanwhile, and keep it busy (EBUSY) at the umount
    that follows until that program's exec (seen in the boundary test's concurrent mounts). The path is
    root's alone (:func:`_check_safe_parent`), so naming it again is safe."""
    result = command.run(["sync", "--file-system", path], check=False, timeout=MOUNT_TIMEOUT)
    if result.status != 0:
        log.warning("syncfs %s failed: %s", path, result.stderr.strip())


def _shown_as_given(device: str) -> bool:
    """Whether mountinfo will name ``device`` as we do. mount(8) resolves symlinks, and names a device-mapper
    device ``/dev/mapper/NAME`` (libmount's canonicalize_dm_name), which is udev's symlink to ``../dm-N``
    where dmsetup synchronises with udev, and libdevmapper's own node where it does not."""
    real = os.path.realpath(device)
    if real == device:
        return True
    sysname = os.path.basename(real)
    dm_name = text_of(str(SYS_CLASS_BLOCK / sysname / "dm" / "name")) if sysname.startswith("dm-") else ""
    return bool(dm_name) and device == f"/dev/mapper/{dm_name}"


def _check_safe_parent(parent: str) -> None:
    """Only root may be able to change the path to the mountpoint: otherwise someone could swap a directory
    for a symlink between our mkdir and the mount, and have root mount over a path of their choice."""
    path = "/"
    for part in [p for p in parent.split("/") if p]:
        path = os.path.join(path, part)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgumentError(f"{path} (on the way to the mount root {parent}) is not a directory")
        sticky = bool(st.st_mode & stat.S_ISVTX)
        group_writable = bool(st.st_mode & stat.S_IWGRP) and st.st_gid != 0
        if st.st_uid != 0 or ((st.st_mode & stat.S_IWOTH or group_writable) and not sticky):
            raise InvalidArgumentError(f"{path} (on the way to the mount root {parent}) can be changed by "
                                       "users other than root: choose a mount root that only root can write")


def _make_mountpoint(mountpoint: str, name: str | None) -> tuple[str, bool]:
    """Create the mountpoint: (its path, True if we created it). Given the ``name`` it was chosen for, a
    mount that made that directory first (between the choice and now) makes us take the next free name;
    without one, an empty directory that is not a mountpoint is used as it is (False)."""
    parent = os.path.dirname(mountpoint)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)  # the mount root: left in place, like udisks does
    _check_safe_parent(parent)
    for _ in range(MAX_NAME_RACES):
        try:
            os.mkdir(mountpoint, 0o700)
            return mountpoint, True
        except FileExistsError:
            if name is None:
                break
            mountpoint = unique_mountpoint(parent, name)
    st = os.lstat(mountpoint)
    if name is not None or not stat.S_ISDIR(st.st_mode) or os.listdir(mountpoint) \
            or mounted_at(mountpoint, mountinfo()):
        raise InvalidArgumentError(f"{mountpoint} already exists and is not an empty directory") from None
    return mountpoint, False


def _chown_mountpoint(mountpoint: str, owner: int) -> None:
    """Only the directory we made is given to the owner, through an fd so a swapped path cannot redirect it;
    the filesystem's own files are never chowned."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, owner, filesystems.primary_gid(owner))
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _mount_error(exc: CommandError, spec: MountSpec, volume: str,
                 driver: FuseDriver | None = None) -> MountdError:
    text, device, fstype, mountpoint = exc.stderr.lower(), spec.device, spec.fstype, spec.mountpoint
    what = f"the {fstype} filesystem on {device}" + (f" (volume {volume})" if volume else "")
    if driver is not None:
        return fusedrivers.refusal(exc, what, driver)
    if "unknown filesystem type" in text:
        try:
            filesystems.check_mountable(fstype)
        except MountdError as unsupported:
            return unsupported
    if "write-protected" in text or ("read-only" in text and not spec.read_only):
        return InvalidArgumentError(f"{what} can only be mounted read-only (the device or the filesystem's "
                                    "features do not allow writing): mount it read-only")
    if any(s in text for s in ("wrong fs type", "bad superblock", "can't read superblock",
                               "structure needs cleaning", "cannot mount", "fsconfig system call failed")):
        check = FSCK.get(fstype, f"fsck.{fstype} -n")
        return InvalidImageError(f"{what} cannot be mounted: the kernel rejects it as damaged or not really "
                                 f"{fstype} (check a copy of the image with {check})")
    if "does not exist" in text:
        return NotFoundError(f"cannot mount {what}: {device} or {mountpoint} does not exist")
    if "already mounted" in text or "busy" in text:
        return BusyError(f"cannot mount {what} on {mountpoint}: the device or mountpoint is busy")
    return FailedError(f"mounting {what} on {mountpoint} failed: {exc.message}")


@dataclass(frozen=True)
class MountSpec(Spec):
    kind: ClassVar[str] = "mount"

    device: str
    mountpoint: str
    fstype: str  # a ``mount -t`` type
    options: tuple[str, ...]  # the full list, from :func:`mountd.host.filesystems.mount_options`
    owner: int
    name: str | None = None  # what the mountpoint was named from
    note: str | None = None  # what the mount does not show (shown with the mount)
    driver: str = ""  # the FUSE program that mounts it (:mod:`mountd.host.fusedrivers`); "": the kernel

    def identity(self) -> dict[str, Any]:
        optional = {k: v for k, v in (("name", self.name), ("note", self.note), ("driver", self.driver)) if v}
        return {"device": self.device, "mountpoint": self.mountpoint, "fstype": self.fstype,
                "options": list(self.options), "owner": self.owner, **optional}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> MountSpec:
        options = identity.get("options")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise InvalidArgumentError(f"mount options {options!r} are not a list of single options")
        try:
            name, note = identity.get("name"), identity.get("note")
            return cls(str(identity["device"]), str(identity["mountpoint"]), str(identity["fstype"]),
                       tuple(options), int(identity["owner"]), None if name is None else str(name),
                       None if note is None else str(note), str(identity.get("driver") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"bad mount layer plan: {exc}") from None

    @property
    def read_only(self) -> bool:
        return "rw" not in self.options


class MountLayer(Layer[MountEntry]):
    """Mount ``device`` on ``mountpoint``.

    Planned identity: device, mountpoint (absolute), fstype (a ``mount -t`` type), options (the full list
    from :func:`mountd.host.filesystems.mount_options`), owner (uid), and optionally the name the mountpoint
    was made from (then a directory that another mount made there meanwhile makes us take the next free name).
    Attached identity adds node (= mountpoint), dev ("major:minor" of the mounted filesystem), mount_id, and
    created (we made the directory).

    Left behind if attach fails: nothing (the directory is removed again); after a crash between mkdir and
    mount, the record says ``created`` and :meth:`detach` removes it.

    With a ``driver`` (:mod:`mountd.host.fusedrivers`), a FUSE driver process mounts it instead of the kernel:
    its pid and start time join the identity, :meth:`verify` checks it still runs, and :meth:`detach`
    unmounts and then waits for it to exit (it writes back on its way out), found by its command line if a
    crash came before it was recorded.
    """

    kind = MountSpec.kind

    @property
    def _spec(self) -> MountSpec:
        return MountSpec.parse(self.identity)

    @property
    def mountpoint(self) -> str:
        return self._spec.mountpoint

    def _planned(self) -> MountSpec:
        """The planned identity, parsed and checked again: it may come from a journal file."""
        spec = self._spec
        mountpoint, device, options = spec.mountpoint, spec.device, spec.options
        if mountpoint == "/" or not os.path.isabs(mountpoint) or os.path.normpath(mountpoint) != mountpoint \
                or not device.startswith("/"):
            raise InvalidArgumentError(f"cannot mount {device!r} on {mountpoint!r}: need absolute paths")
        if not set(filesystems.ALWAYS) <= set(options) or any(set(o) & set(filesystems.BAD_CHARS)
                                                               for o in options):
            raise InvalidArgumentError(f"mount options {list(options)!r} are not single options with "
                                       "nosuid,nodev")
        if not _shown_as_given(device):  # we look our mount up in mountinfo by its device
            raise InvalidArgumentError(f"the device {device} is a symlink: give the device node itself")
        return spec

    def _attach(self, progress: Progress) -> LayerRecord:
        spec = self._planned()
        if self._driver is None:
            filesystems.check_mountable(spec.fstype)
        mountpoint, created = _make_mountpoint(spec.mountpoint, spec.name)
        ident = {**self.identity, "mountpoint": mountpoint, "created": created}
        self.record = replace(self.record, identity=ident)
        try:
            progress(self.record)  # the journal says the directory is ours before anything else can fail
            if created:
                _chown_mountpoint(mountpoint, spec.owner)
            entry = self._mount(replace(spec, mountpoint=mountpoint))
        except BaseException:
            with contextlib.suppress(MountdError):  # the first error is the one to report
                self._remove_mountpoint()
            raise
        log.info("mounted %s (%s) on %s", spec.device, spec.fstype, mountpoint)
        ident.update(node=mountpoint, dev=entry.dev, mount_id=entry.mount_id, **self._driver_process())
        return replace(self.record, identity=ident)

    @property
    def _driver(self) -> FuseDriver | None:
        program = self._spec.driver
        return fusedrivers.by_program(program) if program else None

    def _mount(self, spec: MountSpec) -> MountEntry:
        # -i: no /sbin/mount.TYPE helper (mount.ntfs would be ntfs-3g); -r/-w: mount(8) never falls back
        # from an explicit read-write to a read-only mount on a write-protected device.
        argv = ["mount", "-i", "-r" if spec.read_only else "-w", "-t", spec.fstype,
                "-o", ",".join(spec.options), spec.device, spec.mountpoint]
        driver = self._driver
        if driver is not None:
            argv = fusedrivers.argv(driver, spec.options, spec.device, spec.mountpoint)
        try:
            command.run(argv, timeout=MOUNT_TIMEOUT)
        except CommandError as exc:
            raise _mount_error(exc, spec, self.record.volume, driver) from None
        entry = self._find(mountinfo(), adopt=True)
        if entry is None:
            raise FailedError(f"mount reported success but mountinfo shows no {spec.fstype} mount of "
                              f"{spec.device} on {spec.mountpoint}")
        mode = "ro" if spec.read_only else "rw"
        if mode not in entry.options or not {"nosuid", "nodev"} <= set(entry.options):
            self._umount(lazy=False)
            raise FailedError(f"{spec.device} was mounted on {spec.mountpoint} but mountinfo does not "
                              f"show it {mode},nosuid,nodev: unmounted it again")
        if driver is not None and not self._driver_process():
            self._umount(lazy=False)
            raise FailedError(f"{driver.program} mounted {spec.device} on {spec.mountpoint} but no "
                              "process of it serves the mount: unmounted it again")
        return entry

    def _find(self, entries: list[MountEntry], *, adopt: bool = False) -> MountEntry | None:
        """Our mount, by identity. Without a recorded mount_id (a crash before it was journalled), a mount
        of our device with our type at our path is ours: ``adopt``."""
        ident, device = self.identity, self._spec.device
        for entry in mounted_at(self.mountpoint, entries):
            if entry.source != device:
                continue
            if "mount_id" in ident:
                if entry.mount_id == ident["mount_id"] and entry.dev == ident.get("dev"):
                    return entry
            elif adopt and entry.fstype == self._shown_type:
                return entry
        return None

    @property
    def _shown_type(self) -> str:
        """The type mountinfo shows for our mount."""
        driver = self._driver
        return driver.mounted_as if driver is not None else self._spec.fstype

    def _driver_process(self) -> dict[str, int]:
        """The running driver's pid and start time: recorded, or found by its command line; {} for none."""
        driver, recorded = self._driver, self.record.process
        if driver is None:
            return {}
        if recorded is not None:
            pid, start = recorded
            return {"pid": pid, "start_time": start} if is_alive(pid, start) else {}
        found = fusedrivers.find_driver(driver, self.mountpoint)
        return {"pid": found[0], "start_time": found[1]} if found else {}

    def verify(self) -> bool:
        if "mount_id" not in self.identity or self._find(mountinfo()) is None:
            return False
        return self._driver is None or bool(self._driver_process())

    def _present(self) -> MountEntry | None:
        return self._find(mountinfo(), adopt=True)

    def _release(self, entry: MountEntry, *, force: bool) -> None:
        """Unmount (syncing a read-write filesystem first). Busy: BusyError naming the processes, nothing
        changed; with ``force``, a lazy unmount after that."""
        self._check_on_top(entry, mountinfo())
        if "rw" in entry.options:
            _syncfs(self.mountpoint)
        process = self._driver_process()
        self._unmount(entry, force=force)
        if process:
            fusedrivers.await_exit(process["pid"], process["start_time"], self._spec.driver, force=force)

    def _clean_up(self) -> None:
        """The directory, if we made it."""
        self._remove_mountpoint()

    def _check_on_top(self, entry: MountEntry, entries: list[MountEntry]) -> None:
        """umount takes a path, and would unmount whatever was mounted over ours at the same path."""
        above = [e for e in mounted_at(self.mountpoint, entries) if e.parent_id == entry.mount_id]
        if above:
            raise BusyError(f"{above[0].source} is mounted over {self.mountpoint}: unmount it first")

    def _unmount(self, entry: MountEntry, *, force: bool) -> None:
        result = self._umount(lazy=False)
        if result.status != 0 and "busy" in result.stderr:
            busy = self._busy_message(entry)
            if not force:
                raise BusyError(busy)
            log.warning("lazily unmounting %s: %s", self.mountpoint, busy)
            result = self._umount(lazy=True)
        still = [e for e in mountinfo() if e == entry]  # mount ids are reused at once: compare everything
        if still:
            raise BusyError(f"{self.mountpoint} is still mounted after umount: {result.stderr.strip()}")
        log.info("unmounted %s from %s", self._spec.device, self.mountpoint)

    def _umount(self, *, lazy: bool) -> command.Result:
        argv = ["umount", "-i", *(["-l"] if lazy else []), self.mountpoint]
        return command.run(argv, check=False, timeout=MOUNT_TIMEOUT)

    def _busy_message(self, entry: MountEntry) -> str:
        users = [str(u) for u in mountpoint_users(self.mountpoint)]
        users += kernel_users_under(self.mountpoint)
        users += [f"a mount on {e.mountpoint}" for e in mountinfo() if e.parent_id == entry.mount_id]
        if not users:
            users = ["something no scan here can see (another mount namespace, or the kernel)"]
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        return (f"{self.mountpoint} is busy: in use by {shown}: close those files or leave that directory, "
                "then unmount again (or force a lazy unmount)")

    def _remove_mountpoint(self) -> None:
        if not self.identity.get("created"):
            return
        try:
            os.rmdir(self.mountpoint)
        except FileNotFoundError:
            pass
        except OSError as exc:  # not empty (someone wrote there), or mounted over again
            if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY, errno.ENOTDIR):
                raise FailedError(f"cannot remove the mountpoint {self.mountpoint}: {exc.strerror}") from None
            log.warning("left the mountpoint %s in place: %s", self.mountpoint, exc.strerror)
