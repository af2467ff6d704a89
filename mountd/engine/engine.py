"""The mount engine: image file to mounted filesystems and back (design: "A mount is a stack of layers").

This is the API the D-Bus daemon wraps and that ``imgmount`` runs in-process. Mounts and unmounts of one image
file (by identity: device and inode) are serialised by a cross-process lock of that image's own, so a mount
made by one process is listed and unmounted by another, and a slow mount of one image holds up no other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pwd
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mountd.engine import backends, unlocking
from mountd.engine.cryptvolumes import unlock
from mountd.engine.disks import attacher_of, wanted_disks
from mountd.engine.imagekeys import with_image_key
from mountd.engine.inspection import DiskLayout, Volume
from mountd.engine.journal import Journal, MountRecord
from mountd.engine.mdarrays import striped_here
from mountd.engine.stack import MountStack
from mountd.engine.volumes import VolumeAttacher
from mountd.errors import InUseError, InvalidArgumentError, NotFoundError, UnsupportedError, echo
from mountd.host import fusedrivers
from mountd.host.dmsetup import allow_udev
from mountd.host.filesystems import mount_type, mountable_types
from mountd.host.holders import check_not_in_use
from mountd.host.mediaroot import ensure_private_root
from mountd.host.opener import Credentials, Opener
from mountd.host.support import HostSupport, check_host
from mountd.image.imageinfo import ContainedDisk, ImageInfo, probe_image
from mountd.layers import bitlocker, crypt, dm, fuse, loop, md, mount, nbd, server  # noqa: F401
from mountd.layers.layer import FaultPoints, layer_from_record
from mountd.model import BACKENDS, MountInfo, MountRequest, MountState, find_mount
from mountd.settings import Settings

log = logging.getLogger(__name__)
#: Volumes (and mount options) one request may name: no real image has more mountable volumes than that.
MAX_LISTED = 256


class Engine:
    def __init__(self, journal: Journal | None = None, *, settings: Settings | None = None,
                 host: HostSupport | None = None) -> None:
        """``settings``: what the entry point set up (the defaults when not given); ``journal``: where the
        mounts are recorded (``settings.state_dir`` when not given); ``host``: what this host can do (checked
        at the first mount when not given: an unmount or a listing needs none of it)."""
        self.settings = settings or Settings()
        self._given_host = host
        self.journal = journal or Journal(self.settings.state_dir)
        self.deadline = self.settings.mount_deadline

    @classmethod
    def started(cls, settings: Settings, host: HostSupport | None = None) -> Engine:
        """The engine of an entry point (imgmountd, a command working in-process): what ``settings`` says of
        the floors below, which rebuild each layer from its record alone, is handed down here, once
        (whether dmsetup may wait for udev). An engine made directly leaves that as its process set it."""
        allow_udev(settings.dm_udev)
        return cls(settings=settings, host=host)

    @functools.cached_property
    def host(self) -> HostSupport:
        return self._given_host or check_host()

    # --- queries -----------------------------------------------------------------------------------------

    def mounts(self) -> list[MountInfo]:
        return [r.info() for r in self.journal.all()]

    def find(self, what: str) -> MountInfo:
        return find_mount(self.mounts(), what)

    def verify(self, mount_id: str) -> list[str]:
        """The layers of a mount that the kernel no longer shows as we made them."""
        return _lost(self.journal.read(mount_id))

    # --- mount -------------------------------------------------------------------------------------------

    def mount(self, req: MountRequest, *, confined: Credentials | None = None) -> MountInfo:
        """Mount ``req``; for a ``confined`` (non-root) caller every file is opened, and every QEMU that
        parses the image runs, with that caller's credentials (design: "The guarantee")."""
        _check_request(req)
        with Opener(confined) as opener:  # the image's files, opened once: the descriptors are what we use
            info = probe_image(req.image, fmt=req.format, opener=opener, write=not req.read_only)
            with self.journal.image_locked(info.top.identity):
                return self._mount(req, info, opener)

    def _mount(self, req: MountRequest, info: ImageInfo, opener: Opener) -> MountInfo:
        image = info.top.path
        existing = self._existing(info, req)
        if existing is not None:
            return existing
        _check_snapshot(info, req)
        check_not_in_use(info.files(), read_write=not req.read_only, opened=opener.by_name())
        backend = backends.choose(req.backend, info, self.host)
        record = MountRecord(id=uuid.uuid4().hex[:12], image=image, format=info.format,
                             read_only=req.read_only, owner=req.owner, backend=backend,
                             options=_options(req), image_id=info.top.identity)
        stack = MountStack(self.journal, record, FaultPoints(self.settings.fault_at, self.settings.crash_at))
        with stack.building(self.deadline):
            attachers = [self._attach(stack, backend, part, req, opener.creds)
                         for part in wanted_disks(info, req.volumes)]
            layout = DiskLayout.merged([a.layout for a in attachers])
            mappable = all(a.disk.device_mapper for a in attachers)
            for volume in _selected(layout, req.volumes, mappable, self.host):
                attacher_of(attachers, volume.name).mount(volume)
        log.info("mounted %s (%s, %s) as %s", image, info.format, backend, record.id)
        return stack.record.info()

    def _attach(self, stack: MountStack, backend: str, part: ContainedDisk, req: MountRequest,
                confined: Credentials | None) -> VolumeAttacher:
        """Attach one disk (of several, for an OVA) and find what it holds, its volumes named after it."""
        disk = with_image_key(part.info, req.keys, lambda key_fd: backends.attach_disk(
            stack, backend, part.info, read_only=req.read_only, snapshot=req.snapshot, host=self.host,
            confined=confined, name=part.name, key_fd=key_fd))
        layout = backends.analyse(disk).named(part.name)
        unlocking.check_decrypted(part.info, layout)
        attacher = VolumeAttacher(stack, disk, layout, req, self._mount_root(req), self.host)
        return unlock(attacher, req.volumes)  # locked volumes opened: what they hold joins in

    def _mount_root(self, req: MountRequest) -> str:
        """The caller's choice (root only), else ``<media root>/<user>`` (``/run/media/<user>``): only that
        user and root enter."""
        if req.mount_root is not None:
            return req.mount_root
        root = default_mount_root(self.settings.media_root, req.owner)
        ensure_private_root(root, req.owner)
        return root

    def _existing(self, info: ImageInfo, req: MountRequest) -> MountInfo | None:
        """The same image file mounted twice returns the existing mount (if it fits the request). The same
        file is the same device and inode: another file moved to the path since is another image."""
        image = info.top.path
        for r in self.journal.all():
            if r.image_id != info.top.identity and (r.image_id or r.image != image):
                continue
            if r.read_only != req.read_only:
                mode = "read-only" if r.read_only else "read-write"
                raise InUseError(f"{image} is already mounted {mode} by imgmount (mount {r.id}): "
                                 "unmount it first")
            return r.info()
        return None

    # --- unmount -----------------------------------------------------------------------------------------

    def clean_up(self, mount_id: str) -> MountInfo | None:
        """At start-up: tear down a mount that a crash left half-made, half-unmounted or broken (what no
        longer is ours is left alone by each layer) and return None; or return it, whole, verified. Busy
        layers stop the teardown (MountdError) and what is left stays recorded."""
        with self._held(mount_id) as record:  # not one that a command is making
            if record.state == MountState.MOUNTED and not _lost(record):
                return record.info()
            log.warning("tearing down mount %s of %s, left %s by a crash", record.id, record.image,
                        record.state if record.state != MountState.MOUNTED else MountState.BROKEN)
            MountStack(self.journal, record).teardown()
            return None

    def unmount(self, mount_id: str, *, force: bool = False) -> None:
        with self._held(mount_id) as record:
            MountStack(self.journal, record).teardown(force=force)
            log.info("unmounted %s (%s)", record.image, record.id)

    @contextlib.contextmanager
    def _held(self, mount_id: str) -> Iterator[MountRecord]:
        """The mount's record as it is once its image's lock is ours."""
        with self.journal.image_locked(self.journal.read(mount_id).lock_key):
            yield self.journal.read(mount_id)


def _lost(record: MountRecord) -> list[str]:
    return [layer.describe() for rec in record.layers if not (layer := layer_from_record(rec)).verify()]



def default_mount_root(media_root: Path, uid: int) -> str:
    """``<media_root>/<user>`` (``/run/media/<user>``, where desktop file managers look)."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return str(media_root / user)


def _check_request(req: MountRequest) -> None:
    if len(req.volumes) > MAX_LISTED or len(req.mount_options) > MAX_LISTED:
        raise InvalidArgumentError(f"at most {MAX_LISTED} volumes and {MAX_LISTED} mount options per mount")
    if req.backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {echo(req.backend)!r}: use one of {', '.join(BACKENDS)}")
    if req.mount_root is not None and not os.path.isabs(req.mount_root):
        raise InvalidArgumentError(f"the mount root must be an absolute path: {req.mount_root}")
    if req.snapshot is not None and not req.read_only:
        raise InvalidArgumentError("an internal snapshot can only be mounted read-only")


def _check_snapshot(info: ImageInfo, req: MountRequest) -> None:
    if req.snapshot is None:
        return
    names = {s.name for s in info.top.snapshots} | {s.id for s in info.top.snapshots}
    if req.snapshot not in names:
        known = ", ".join(sorted(s.name for s in info.top.snapshots)) or "none"
        raise NotFoundError(f"{info.top.path} has no internal snapshot {echo(req.snapshot)!r} "
                            f"(it has: {known})")


def _options(req: MountRequest) -> dict[str, Any]:
    return {"volumes": list(req.volumes), "mount-root": req.mount_root, "snapshot": req.snapshot,
            "requested-backend": req.backend, "mount-options": list(req.mount_options)}


def _selected(layout: DiskLayout, names: tuple[str, ...], device_mapper: bool,
              host: HostSupport) -> list[Volume]:
    """The volumes asked for, or every volume that holds a mountable filesystem and can be reached."""
    if names:
        names = tuple(dict.fromkeys(names))  # each volume once, however often it is named
        missing = [n for n in names if layout.volume(n) is None]
        if missing:
            known = _some(v.name for v in layout.volumes) or "none"
            raise NotFoundError(f"no volume named {echo(', '.join(missing))} in this image (it has: {known})")
        return [v for n in names if (v := layout.volume(n)) is not None]
    types = fusedrivers.mountable_types(mountable_types(), host)
    chosen = [v for v in layout.volumes if _mapped_later(v, device_mapper, host)
              or ((v.offset is not None or device_mapper) and _mountable(v, types, host))]
    if not chosen:
        found = _some(f"{v.name}: {v.signature.type if v.signature else 'nothing'}" for v in layout.volumes)
        raise UnsupportedError(f"no mountable filesystem in this image (found {found})")
    if len(chosen) > MAX_LISTED:
        raise UnsupportedError(f"this image holds {len(chosen)} mountable volumes, more than the "
                               f"{MAX_LISTED} one mount takes: name the ones to mount (imgmount --volume)")
    return chosen


def _mapped_later(volume: Volume, device_mapper: bool, host: HostSupport) -> bool:
    """A thin LV where device-mapper is, or an array md assembles here: what it holds shows once it is
    mapped (:meth:`mountd.engine.volumes.VolumeAttacher.mount`)."""
    return (volume.thin and device_mapper) or striped_here(volume, host)


def _mountable(volume: Volume, types: frozenset[str], host: HostSupport) -> bool:
    """Whether a mount of every volume includes ``volume``: a filesystem this host mounts, or a lock it opens
    (the mount then asks for its key)."""
    fs = volume.filesystem
    return bool(fs and mount_type(fs, types) in types) or unlocking.can_unlock(volume, host)


def _some(names: Iterable[str], shown: int = 20) -> str:
    """At most ``shown`` names, and how many more: an error stays one readable line."""
    listed = list(names)
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    return ", ".join(listed[:shown]) + more

