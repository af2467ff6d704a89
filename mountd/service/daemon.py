"""``imgmountd``: the D-Bus service (design: "D-Bus API, version 1", "Daemon life cycle").

- Start: tear down every stack a crash left half-made, half-unmounted or broken (what is busy stays, published
  with State "broken"), publish every whole one again, drop device marks no record names, then take the bus
  name (``Type=dbus`` readiness).
- Calls: :mod:`mountd.service.dispatch` hands each to the :class:`Service`, in a task of its own; the
  engine's blocking work runs in worker threads, so other callers are served meanwhile; calls for one image
  are serialized.
- SIGTERM: refuse new calls, unmount everything, each mount on its own (images inside other mounts first,
  each stack top-down, flushing; a stack in use is left whole, recorded, for the next start to adopt), and
  what the calls still running make once they end; exit.
  SIGKILL loses nothing: the QEMU servers outlive us, the journal says what exists, and the next start
  publishes it again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from dbus_fast import NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from mountd.engine.engine import Engine
from mountd.engine.inspection import inspect_image
from mountd.engine.render import inspection_to_dict
from mountd.errors import MountdError, NotAuthorizedError, NotFoundError
from mountd.host.mediaroot import fix_existing_roots
from mountd.host.opener import Credentials, check_path
from mountd.host.support import check_host
from mountd.image.imageinfo import image_path
from mountd.model import MountInfo, MountRequest, MountState
from mountd.service.auth import ACTION_MOUNT, ACTION_MOUNT_RW, ACTION_UNMOUNT_OTHERS, Authority, Caller
from mountd.service.busfix import connect
from mountd.service.dbusapi import (
    BUS_NAME,
    MANAGER_PATH,
    MOUNTS_PATH,
    ManagerInterface,
    MountInterface,
    check_text,
    mount_path,
)
from mountd.service.dispatch import Dispatcher, start_workers
from mountd.service.keyoptions import keys_from
from mountd.settings import Settings

log = logging.getLogger("mountd.service.daemon")
MOUNT_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
NOGROUP = 65534  # a caller in no group at all gets this one, never a group that happens to share its uid


class ImageLocks:
    """One asyncio lock per image path, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def busy(self, key: str) -> bool:
        return key in self._locks


class Service:
    """The daemon's state: the engine, the published Mount objects, and the rules for each call."""

    def __init__(self, bus: MessageBus, engine: Engine, authority: Authority, backends: list[str]) -> None:
        self.bus = bus
        self.engine = engine
        self.authority = authority
        self.manager = ManagerInterface(self, backends)
        self.objects: dict[str, MountInterface] = {}
        self.locks = ImageLocks()
        self.closing = False

    # --- calls ---------------------------------------------------------------------------------------------

    async def inspect(self, caller: Caller, image: str, options: dict[str, Any],
                      key_fd: int = -1) -> dict[str, Any]:
        await self.authority.require(caller, ACTION_MOUNT, interactive=caller.interactive,
                                     details={"image": image})
        full = await _image(caller, image)
        keys = await asyncio.to_thread(keys_from, options.get("passphrases", {}), key_fd)
        async with self.locks.hold(full):
            found = await asyncio.to_thread(inspect_image, full, fmt=options.get("format"),
                                            confined=confined(caller), host=self.engine.host, keys=keys)
            return inspection_to_dict(found)

    async def mount(self, caller: Caller, image: str, options: dict[str, Any], key_fd: int = -1) -> MountInfo:
        read_only = bool(options.get("read-only", True))
        await self.authority.require(caller, ACTION_MOUNT if read_only else ACTION_MOUNT_RW,
                                     interactive=caller.interactive,
                                     details={"image": image, "read-only": str(read_only).lower()})
        if "mount-root" in options and not caller.is_root:
            raise NotAuthorizedError("only root may choose the mount root: leave out mount-root and the "
                                     "volumes are mounted under /run/media/<user>")
        full = await _image(caller, image)
        keys = await asyncio.to_thread(keys_from, options.get("passphrases", {}), key_fd)
        req = MountRequest(image=full, read_only=read_only, volumes=tuple(options.get("volumes", ())),
                           mount_root=options.get("mount-root"), format=options.get("format"),
                           snapshot=options.get("snapshot"), backend=options.get("backend", "auto"),
                           mount_options=tuple(options.get("mount-options", ())), owner=caller.uid,
                           keys=keys)
        async with self.locks.hold(full):
            info = await asyncio.to_thread(self.engine.mount, req, confined=confined(caller))
            self.publish(info, info.state)
        return info

    async def unmount(self, caller: Caller, mount_id: str, *, force: bool) -> None:
        obj = self.objects.get(mount_id)
        if obj is None:
            raise NotFoundError("no such mount (ListMounts lists them)")
        if not caller.is_root and obj.info.owner != caller.uid:
            await self.authority.require(caller, ACTION_UNMOUNT_OTHERS, interactive=caller.interactive,
                                         details={"image": obj.info.image})
        async with self.locks.hold(obj.info.image):
            try:
                await asyncio.to_thread(self.engine.unmount, mount_id, force=force)
            finally:
                await self.sync(mount_id)

    def id_of(self, path: str) -> str:
        mount_id = path.removeprefix(MOUNTS_PATH + "/")
        if mount_id not in self.objects:
            raise NotFoundError("no such mount (ListMounts lists them)")  # not echoed: not yet authorized
        return mount_id

    def published(self) -> list[str]:
        return sorted(self.objects)

    # --- objects -------------------------------------------------------------------------------------------

    def publish(self, info: MountInfo, state: str) -> None:
        obj = self.objects.get(info.id)
        if obj is not None:
            obj.update(info, state)
            return
        if not MOUNT_ID.match(info.id):
            log.warning("not publishing mount %r: its id cannot be a D-Bus object path", info.id)
            return
        obj = self.objects[info.id] = MountInterface(self, info, state)
        self.bus.export(mount_path(info.id), obj)
        self.manager.mount_added(mount_path(info.id))

    def unpublish(self, mount_id: str) -> None:
        if self.objects.pop(mount_id, None) is not None:
            self.bus.unexport(mount_path(mount_id))
            self.manager.mount_removed(mount_path(mount_id))

    async def sync(self, mount_id: str) -> None:
        """Publish what the journal now says about one mount (gone, or changed)."""
        try:
            info, why = await asyncio.to_thread(self._verified, mount_id)
        except NotFoundError:
            self.unpublish(mount_id)
            return
        obj = self.objects.get(mount_id)
        if why and (obj is None or obj.state != MountState.BROKEN):
            log.warning("mount %s of %s is broken: %s", mount_id, info.image, why)
        self.publish(info, MountState.BROKEN if why else MountState.MOUNTED)

    def _verified(self, mount_id: str) -> tuple[MountInfo, str]:
        """The mount as recorded, and why it is broken ("" if the kernel still shows all we made)."""
        info = self.engine.journal.read(mount_id).info()
        if info.state != MountState.MOUNTED:  # an operation was interrupted: what is left can only go
            return info, f"the journal records it as {info.state}, not mounted"
        try:
            lost = self.engine.verify(mount_id)
        except MountdError as exc:
            lost = [str(exc)]
        return info, f"{', '.join(lost)} no longer as we made it" if lost else ""

    async def refresh_state(self, mount_id: str) -> str:
        """The State property: verified on each read, unless an operation on the image is under way."""
        obj = self.objects.get(mount_id)
        if obj is None:
            return "unmounted"
        if self.locks.busy(obj.info.image):
            return obj.state
        async with self.locks.hold(obj.info.image):  # taken at once: an unmount waits for our look
            try:
                await self.sync(mount_id)
            except Exception:  # a getter's exception would reach the caller as dbus-fast's own error
                log.exception("verifying mount %s failed", mount_id)
                obj.update(obj.info, MountState.BROKEN)
        return obj.state

    async def recover(self) -> None:
        """Tear down what a crash left half-made, half-unmounted or broken; publish every mount the journal
        still records (one unreadable record does not hide the others); drop device marks no record names."""
        root = self.engine.journal.mounts
        ids = sorted(p.stem for p in root.glob("*.json")) if root.is_dir() else []
        for mount_id in ids:
            whole = None
            try:
                whole = await asyncio.to_thread(self.engine.clean_up, mount_id)
            except MountdError as exc:
                log.warning("mount %s stays as a crash left it: %s", mount_id, exc)
            except Exception:  # a damaged record: the others are still torn down and published
                log.exception("cannot tear down mount %s: left as it is", mount_id)
            try:
                if whole is not None:  # verified just now, under its image's lock
                    self.publish(whole, MountState.MOUNTED)
                else:
                    await self.sync(mount_id)
            except Exception:
                log.exception("cannot publish mount %s from the journal: left alone", mount_id)
        orphans = await asyncio.to_thread(self.engine.journal.prune_claims)
        if orphans:
            log.info("removed device marks that no mount records: %s", ", ".join(orphans))
        log.info("published %d mount(s) from the journal", len(self.objects))

    async def shutdown(self, calls: Awaitable[None]) -> bool:
        """Unmount everything, each mount in a task of its own that first waits for the mounts whose images
        lie inside it: a mount that cannot come off (her own QEMU stopped, her Unmount stuck on it) holds up
        only itself and what contains it, never the others. Mounts made by ``calls`` (those in flight) are
        unmounted once those calls end. True if nothing is left."""
        tasks: dict[str, asyncio.Task[bool]] = {}
        self._unmount_each(tasks)
        await calls
        self._unmount_each(tasks)
        return all(await asyncio.gather(*tasks.values()))

    def _unmount_each(self, tasks: dict[str, asyncio.Task[bool]]) -> None:
        """Start the unmount of every published mount that has none yet."""
        mounts = [o.info for o in self.objects.values() if o.info.id not in tasks]
        for info in shutdown_order(mounts):  # the mounts inside one come before it (but in a cycle)
            inner = [tasks[m.id] for m in mounts if m.id in tasks and _inside(m.image, info)]
            tasks[info.id] = asyncio.create_task(self._unmount_after(inner, info))

    async def _unmount_after(self, inner: Sequence[asyncio.Task[bool]], info: MountInfo) -> bool:
        if inner:
            await asyncio.wait(inner)
        async with self.locks.hold(info.image):
            if info.id not in self.objects:  # a call in flight unmounted it first
                return True
            clean = await self._unmount_at_shutdown(info)
            await self.sync(info.id)
        return clean

    async def _unmount_at_shutdown(self, info: MountInfo) -> bool:
        """Unmount, flushing; a stack in use is left whole (no lazy unmount: that would leave its QEMU
        serving a filesystem nobody can reach or unmount), still recorded, for the next start to adopt."""
        try:
            await asyncio.to_thread(self.engine.unmount, info.id)
            return True
        except MountdError as exc:
            log.warning("left mount %s of %s in place: %s; the next imgmountd adopts it, and imgumount "
                        "unmounts it once it is free", info.id, info.image, exc)
        except Exception:  # a bug of ours in one mount's teardown: the others still come off
            log.exception("cannot unmount mount %s of %s: left in place", info.id, info.image)
        return False


def shutdown_order(mounts: Sequence[MountInfo]) -> list[MountInfo]:
    """Mounts ordered so that one whose image lies inside another mount's filesystem comes first."""
    order: list[MountInfo] = []
    left = list(mounts)
    while left:
        ready = [m for m in left if not any(_inside(o.image, m) for o in left if o is not m)] or left[:1]
        order += ready
        left = [m for m in left if m not in ready]
    return order


def _inside(image: str, holder: MountInfo) -> bool:
    """Whether ``image`` lies in one of the filesystems ``holder`` mounted."""
    return any(image.startswith(v.mountpoint.rstrip("/") + "/") for v in holder.volumes if v.mountpoint)


async def _image(caller: Caller, image: str) -> str:
    """The image path as given, checked as text; root's is resolved here, a caller's never as root (its
    own opener resolves it, with its own rights: design, "The guarantee")."""
    check_text(image, "the image path")
    check_path(image)
    return await asyncio.to_thread(image_path, image) if caller.is_root else image


def confined(caller: Caller) -> Credentials | None:
    """Whom a caller's files are opened, and its QEMU run, as: None for root."""
    if caller.is_root:
        return None
    return Credentials(caller.uid, caller.gids or (NOGROUP,))


# --- main -------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgmountd", description="The imgmount D-Bus service (run by D-Bus "
                                "activation or systemd, as root).")
    p.add_argument("--bus", default="system", metavar="system|session|ADDRESS",
                   help="the bus to serve on (default: the system bus; DBUS_SYSTEM_BUS_ADDRESS is honoured)")
    p.add_argument("--debug", action="store_true", help="log every command run")
    return p


async def serve(args: argparse.Namespace) -> int:
    start_workers()
    bus = await connect(args.bus)
    host = await asyncio.to_thread(check_host)  # once: what is missing is said here, not at each mount
    for program in host.missing:
        log.warning("%s is missing (Debian package %s): no %s", program.name, program.package,
                    program.used_for)
    log.info("%s", host.summary())
    engine = Engine.started(Settings.from_environment(), host=host)
    try:
        await asyncio.to_thread(engine.journal.ensure)
    except OSError as exc:  # every mount would fail on it: say so once, and do not take the name
        log.error("cannot use the state directory %s: %s", engine.journal.root, exc.strerror or exc)
        return 1
    service = Service(bus, engine, Authority(bus), host.backends())
    dispatcher = Dispatcher(bus, service)
    bus.add_message_handler(dispatcher.on_message)
    bus.export(MANAGER_PATH, service.manager)
    # mount roots that older versions left world-readable
    await asyncio.to_thread(fix_existing_roots, str(engine.settings.media_root))
    await service.recover()
    if await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE) != RequestNameReply.PRIMARY_OWNER:
        log.error("%s is already owned on this bus: another imgmountd is running", BUS_NAME)
        return 1
    log.info("serving %s", BUS_NAME)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    lost = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([lost, stopping], return_when=asyncio.FIRST_COMPLETED)
    if lost.done():
        log.error("lost the bus connection: exiting; the mounts stay and a restart publishes them again")
        return 1
    log.info("stopping: unmounting everything")
    service.closing = True
    clean = await service.shutdown(dispatcher.drain())
    bus.disconnect()
    with contextlib.suppress(Exception):
        await lost
    return 0 if clean else 1


def _return_freed_memory() -> None:
    """Blocks over 256 KiB (LVM metadata texts, up to 8 MiB each) come from mmap and go back to the kernel
    when freed; from glibc's per-thread arenas they would keep the daemon's RSS at its peak for ever."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 256 << 10)


def main(argv: Sequence[str] | None = None) -> int:
    _return_freed_memory()
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as exc:  # no bus at that address, or a malformed address
        log.error("cannot connect to the %s bus: %s", args.bus, exc)
        return 1
