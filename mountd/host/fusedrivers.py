"""Filesystems mounted by a FUSE driver where the kernel cannot mount them: NTFS through ``ntfs-3g`` (Debian
12's kernel has no ntfs3), FAT through ``fusefat`` and exFAT through ``exfat-fuse`` (kernels built without
vfat/exfat). The kernel's driver always wins where it has one (:func:`driver_for`).

A driver is a root process of its own: started with the options the kernel driver would get (from
:func:`mountd.host.filesystems.mount_options`: ``uid``/``gid`` of the owner) plus what makes a FUSE mount
behave like a kernel one (:func:`driver_options`): ``allow_other`` (without it only root, who mounted it,
could enter, not the owner), ``default_permissions`` (the kernel checks the mode bits the driver reports, as
for any filesystem, instead of the driver deciding) and ``umask=022`` (the kernel drivers' default for a
daemon; ntfs-3g's own default is 0, world-writable). Who can reach the files is then decided as for kernel
mounts: the private mount root (:mod:`mountd.host.mediaroot`) and the owner's mode bits.

Each driver forks into the background once its filesystem is mounted (ntfs-3g: ``daemon()`` after
``fuse_mount``; libfuse's ``fuse_daemonize`` for the others), so the command returns the verdict, and the
process found by :func:`find_driver` (root's, with our mountpoint on its command line) is the one the mount
layer records, verifies and waits for at unmount.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mountd.errors import CommandError, InvalidArgumentError, InvalidImageError, MountdError, UnsupportedError
from mountd.host.processes import has_exited, open_process, proc_state, stop
from mountd.host.support import HostSupport

log = logging.getLogger(__name__)

DEFAULT_UMASK = "umask=022"
EXIT_TIMEOUT = 60.0  # a driver writing back a large read-write mount on its way out
MASKS = ("umask", "fmask", "dmask")


@dataclass(frozen=True)
class FuseDriver:
    program: str
    fstype: str  # the blkid type it mounts
    mounted_as: str  # the type mountinfo shows
    accepts: frozenset[str]  # filesystem options a caller may give it, beyond the generic ones
    writes: bool = True  # False: its write support is experimental, and read-write is refused
    names_source: bool = False  # needs ``fsname=DEVICE`` for mountinfo to show the device as the source
    check: str = ""  # how to check a damaged one

    def describe(self) -> str:
        return f"{self.program} (FUSE)"


DRIVERS: dict[str, FuseDriver] = {d.fstype: d for d in (
    FuseDriver("ntfs-3g", "ntfs", "fuseblk", frozenset({*MASKS, "hide_dot_files", "windows_names"}),
               check="chkdsk /f in Windows, or ntfsfix -n on a copy of the image"),
    FuseDriver("mount.exfat-fuse", "exfat", "fuseblk", frozenset(MASKS), check="fsck.exfat -n on a copy"),
    FuseDriver("fusefat", "vfat", "fuse.fusefat", frozenset({"umask"}), writes=False, names_source=True,
               check="fsck.vfat -n on a copy"),
)}
#: Options libfuse takes for every FUSE filesystem (fuse(8)); kernel-only generic options are refused.
FUSE_GENERIC = frozenset({"ro", "rw", "nosuid", "nodev", "noexec", "noatime", "atime", "relatime",
                          "strictatime", "nodiratime", "sync", "async", "dirsync"})


def driver_for(fstype: str, kernel_types: frozenset[str], host: HostSupport) -> FuseDriver | None:
    """The FUSE driver that mounts ``fstype`` (a ``mount -t`` type) on this host, or None when the kernel
    can, or no driver is there (then the kernel's error names the module)."""
    driver = DRIVERS.get(fstype)
    if driver is None or fstype in kernel_types or not host.fuse or not host.has(driver.program):
        return None
    return driver


def mountable_types(kernel_types: frozenset[str], host: HostSupport) -> frozenset[str]:
    """What this host mounts: the kernel's types and those a FUSE driver here mounts."""
    return kernel_types | {t for t in DRIVERS if driver_for(t, kernel_types, host)}


def driver_options(driver: FuseDriver, options: Sequence[str], requested: Sequence[str],
                   device: str) -> list[str]:
    """The driver's ``-o`` list: ``options`` (from :func:`mountd.host.filesystems.mount_options`, which
    checked ``requested`` against the kernel allow-list) and what makes the FUSE mount behave like a kernel
    one. A requested option the driver does not take is refused here rather than by the driver."""
    if "rw" in options and not driver.writes:
        raise UnsupportedError(f"{driver.fstype} volumes mount read-only on this host: the kernel has no "
                               f"{driver.fstype} driver and {driver.program} writes only experimentally "
                               "(mount it read-only)")
    for option in requested:
        name = option.partition("=")[0]
        if name not in FUSE_GENERIC and name not in driver.accepts:
            raise InvalidArgumentError(
                f"mount option {option!r} is not taken by {driver.program}, which mounts {driver.fstype} "
                f"here (it takes: {', '.join(sorted(FUSE_GENERIC | driver.accepts))})")
    found = list(options)
    if not any(o.partition("=")[0] in MASKS for o in found):
        found.append(DEFAULT_UMASK)
    found += ["allow_other", "default_permissions"]
    if driver.names_source:
        found += [f"fsname={device}", f"subtype={driver.mounted_as.removeprefix('fuse.')}"]
    return found


def argv(driver: FuseDriver, options: Sequence[str], device: str, mountpoint: str) -> list[str]:
    return [driver.program, "-o", ",".join(options), device, mountpoint]


def by_program(program: str) -> FuseDriver:
    """The driver a journal record names (never a program of the record's choosing)."""
    driver = next((d for d in DRIVERS.values() if d.program == program), None)
    if driver is None:
        raise InvalidArgumentError(f"{program!r} is not a FUSE filesystem driver imgmount runs")
    return driver


def find_driver(driver: FuseDriver, mountpoint: str) -> tuple[int, int] | None:
    """(pid, start time) of root's ``driver`` process serving ``mountpoint``: its command line names it.
    Only root's processes count: a user's copy of the program with the same arguments is not ours."""
    needle = os.fsencode(mountpoint)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv_ = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if os.stat(f"/proc/{pid}").st_uid != 0 or not argv_ or needle not in argv_:
                continue
            found = proc_state(int(pid))
            if os.path.basename(argv_[0]) == driver.program.encode() and found is not None \
                    and found.state not in ("Z", "X"):
                return int(pid), found.start_time
    return None


def refusal(exc: CommandError, what: str, driver: FuseDriver) -> MountdError:
    """A FUSE driver's refusal, in its own words (ntfs-3g explains hibernation and unclean logs)."""
    why = _cause(exc.stderr)[:300] or f"exit status {exc.status}"
    if any(s in exc.stderr.lower() for s in ("hibernat", "unclean", "fast restart")):
        return InvalidArgumentError(f"{driver.program} refuses to mount {what} read-write: {why} "
                                    "(mount it read-only)")
    return InvalidImageError(f"{driver.program} cannot mount {what}: {why} (check it with {driver.check})")


def _cause(stderr: str) -> str:
    """ntfs-3g says "Failed to mount '...': <errno text>" after the line that names the cause, then prints
    advice; other drivers end with their cause."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if line.startswith("Failed to mount")), None)
    return "; ".join(lines[-2:] if at is None else lines[max(0, at - 1):at + 1])


def await_exit(pid: int, started: int, program: str, *, force: bool) -> None:
    """Wait for a FUSE driver to exit after its unmount (it writes its last changes back first); one that
    does not is stopped, its filesystem being gone. After a lazy unmount (``force``) a driver still serving
    open files is left to exit by itself when they are closed."""
    pidfd = open_process(pid, started)
    if pidfd is None:
        return
    try:
        if has_exited(pidfd, EXIT_TIMEOUT):
            return
        if force:
            log.warning("%s (pid %d) still serves open files after a lazy unmount: it exits when they are "
                        "closed", program, pid)
            return
        stop(pidfd, f"{program} (pid {pid})", force=False)
    finally:
        os.close(pidfd)
