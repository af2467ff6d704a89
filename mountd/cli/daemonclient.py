"""The engine's interface over D-Bus to imgmountd (:class:`DaemonClient`), for the commands.

Each D-Bus error becomes the error (message and exit code) the commands print. D-Bus strings must be UTF-8,
file names need not be: a Mount of a path that is not UTF-8 is refused here with a message saying so (the API
takes the path as a string: carrying the bytes would take a new API, e.g. the image passed as a file
descriptor), while an in-process engine mounts it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from mountd.busnames import (
    BUS_NAME,
    ERROR_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    MOUNT_IFACE,
    mount_info,
    mount_path,
)
from mountd.cli.client import (
    ALLOW_INTERACTIVE_AUTHORIZATION,
    BusConnection,
    BusError,
    Call,
    Variant,
    driver_call,
    system_bus_address,
)
from mountd.cli.keyinput import everywhere_fd, passphrases
from mountd.cli.output import logger
from mountd.errors import (
    BusyError,
    FailedError,
    InUseError,
    InvalidArgumentError,
    InvalidImageError,
    MountdError,
    NoFreeDeviceError,
    NotAuthorizedError,
    NotFoundError,
    OperationTimeoutError,
    UnsupportedError,
)
from mountd.model import MountInfo, MountRequest, display_name, find_mount

CONNECT_TIMEOUT = 5.0
BUS_ERROR = "org.freedesktop.DBus.Error"
# Each D-Bus error name of the API and the error (message, exit code) it becomes here.
ERRORS: dict[str, type[MountdError]] = {cls.dbus_name: cls for cls in (
    InvalidArgumentError, NotFoundError, InvalidImageError, UnsupportedError, InUseError, BusyError,
    NoFreeDeviceError, NotAuthorizedError, OperationTimeoutError, FailedError)}


class DaemonUnavailableError(FailedError):
    """The bus could not start the daemon (activation failed): root may run the engine in-process."""


class DaemonClient:
    """The engine's interface, over D-Bus to imgmountd: the small blocking client of
    :mod:`mountd.cli.client`, so a command that talks to the daemon imports neither dbus-fast nor asyncio nor
    the engine."""

    def __init__(self, bus: BusConnection) -> None:
        self.bus = bus

    @classmethod
    def connect(cls) -> DaemonClient | None:
        """A client, or None when there is no system bus or the daemon is neither running nor activatable."""
        bus = _system_bus()
        if bus is None:
            return None
        try:
            if _daemon_available(bus):
                return cls(bus)
        except (OSError, BusError) as exc:
            logger().debug("the system bus went away: %s", exc)
        bus.close()
        return None

    def close(self) -> None:
        self.bus.close()

    def _call(self, path: str, interface: str, member: str, signature: str = "",  # noqa: PLR0917
              body: Sequence[Any] = (), fds: Sequence[int] = ()) -> list[Any]:
        # A command run from a terminal lets polkit ask for a password, if the session has an agent.
        flags = ALLOW_INTERACTIVE_AUTHORIZATION if sys.stdin.isatty() else 0
        try:
            reply = self.bus.call(Call(BUS_NAME, path, interface, member, signature, body, flags, fds))
        except (OSError, BusError) as exc:
            raise FailedError(f"lost the connection to imgmountd on the system bus ({exc})") from exc
        if reply.error is None:
            return reply.body
        raise _error(reply.error, str(reply.body[0]) if reply.body else "")

    def mounts(self) -> list[MountInfo]:
        objects = self._call(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")[0]
        found = [mount_info(path, ifaces[MOUNT_IFACE]) for path, ifaces in objects.items()
                 if MOUNT_IFACE in ifaces]
        return sorted(found, key=lambda m: m.id)

    def find(self, what: str) -> MountInfo:
        return find_mount(self.mounts(), what)

    def mount(self, req: MountRequest) -> MountInfo:
        _check_utf8(req)
        with everywhere_fd(req.keys) as key_fd:
            return self._mount(req, key_fd)

    def _mount(self, req: MountRequest, key_fd: int) -> MountInfo:
        """Mount with the keys as options: named passphrases, and the one for everywhere at ``key_fd``."""
        options = {"read-only": Variant("b", req.read_only), "backend": Variant("s", req.backend)}
        if req.keys.by_volume:
            options["passphrases"] = Variant("a{ss}", passphrases(req.keys))
        if key_fd >= 0:
            options["key-file"] = Variant("h", 0)
        for key, value in (("volumes", list(req.volumes)), ("mount-options", list(req.mount_options))):
            if value:
                options[key] = Variant("as", value)
        for key, text in (("mount-root", req.mount_root), ("format", req.format), ("snapshot", req.snapshot)):
            if text is not None:
                options[key] = Variant("s", text)
        path = self._call(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}", [req.image, options],
                          fds=[key_fd] if key_fd >= 0 else [])[0]
        props = self._call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [MOUNT_IFACE])[0]
        return mount_info(path, props)

    def unmount(self, mount_id: str, *, force: bool = False) -> None:
        self._call(MANAGER_PATH, MANAGER_IFACE, "Unmount", "oa{sv}",
                   [mount_path(mount_id), {"force": Variant("b", force)}])


def _check_utf8(req: MountRequest) -> None:
    """D-Bus strings are UTF-8: a name that is not is refused here, said plainly, not by the marshaller."""
    if not _is_utf8(req.image):
        raise InvalidArgumentError(f"the image path {display_name(req.image)} is not valid UTF-8, which "
                                   "D-Bus cannot carry to imgmountd: rename the file, or point a symlink "
                                   "with a UTF-8 name at it")
    named = [("mount root", req.mount_root or ""), ("snapshot name", req.snapshot or ""),
             *(("volume name", x) for x in req.volumes), *(("mount option", x) for x in req.mount_options)]
    for what, text in named:
        if not _is_utf8(text):
            raise InvalidArgumentError(f"the {what} {display_name(text)} is not valid UTF-8, which D-Bus "
                                       "cannot carry to imgmountd")


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _system_bus() -> BusConnection | None:
    try:
        return BusConnection.connect(system_bus_address(), CONNECT_TIMEOUT)
    except (OSError, BusError, ValueError) as exc:
        logger().debug("no system bus: %s", exc)
        return None


def _daemon_available(bus: BusConnection) -> bool:
    def ask(member: str, signature: str = "", body: Sequence[Any] = ()) -> Any:
        reply = bus.call(driver_call(member, signature, body))
        return reply.body[0] if reply.error is None and reply.body else None

    if ask("NameHasOwner", "s", [BUS_NAME]):
        return True
    return BUS_NAME in (ask("ListActivatableNames") or [])


def _error(name: str, text: str) -> MountdError:
    """One D-Bus error as the error (message and exit code) the commands print."""
    if name.startswith(ERROR_PREFIX):
        return ERRORS.get(name.removeprefix(ERROR_PREFIX), FailedError)(text)
    if name == f"{BUS_ERROR}.AccessDenied":
        return NotAuthorizedError(f"the system bus does not let you call imgmountd ({text}): its bus policy "
                                  "(io.github.imgmount.Mountd1.conf) is missing or changed")
    if name in (f"{BUS_ERROR}.NoReply", f"{BUS_ERROR}.Timeout"):
        return OperationTimeoutError(f"imgmountd did not answer in time ({text}): see its log "
                                     "(journalctl -u imgmountd)")
    if name == f"{BUS_ERROR}.ServiceUnknown" or name.startswith(f"{BUS_ERROR}.Spawn"):
        return DaemonUnavailableError(f"imgmountd could not be started ({text}): see journalctl -u imgmountd")
    return FailedError(f"imgmountd: {name}: {text}")
