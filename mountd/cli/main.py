"""The ``imgmount`` and ``imgumount`` commands.

They call the daemon on the system bus (D-Bus activation starts it). With no system bus, or no daemon that
is running or can be activated, root runs the same engine in-process, so a fresh machine needs no installed
units for a first try; so does a command given ``IMGMOUNT_STATE_DIR`` (only an in-process engine can use
another state directory). ``--info`` always runs in-process: it mounts nothing, and reads the image with the
caller's own rights.

Every failure is one line on stderr naming the cause and the fix, and an exit code per error kind
(:mod:`mountd.errors`); ``--json`` prints machine-readable results, and errors as
``{"error": ..., "message": ...}``.

File names need not be UTF-8; D-Bus strings must be. So a Mount through the daemon of a path that is not
UTF-8 is refused with a message saying so (the API takes the path as a string: carrying the bytes would take a
new API, e.g. the image passed as a file descriptor), while an in-process engine mounts it. Whatever is
printed shows such names as :func:`~mountd.model.display_name` does (``\\xNN``), as the daemon does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

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
from mountd.model import BACKENDS, MountInfo, MountRequest, display_name, find_mount
from mountd.settings import STATE_DIR_ENV

if TYPE_CHECKING:
    import logging

    from mountd.engine.engine import Engine

T = TypeVar("T")
CONNECT_TIMEOUT = 5.0
BUS_ERROR = "org.freedesktop.DBus.Error"
# Each D-Bus error name of the API and the error (message, exit code) it becomes here.
ERRORS: dict[str, type[MountdError]] = {cls.dbus_name: cls for cls in (
    InvalidArgumentError, NotFoundError, InvalidImageError, UnsupportedError, InUseError, BusyError,
    NoFreeDeviceError, NotAuthorizedError, OperationTimeoutError, FailedError)}


class Mounter(Protocol):
    """What the commands need: the engine in-process, or the daemon over D-Bus."""

    def mounts(self) -> list[MountInfo]: ...

    def find(self, what: str) -> MountInfo: ...

    def mount(self, req: MountRequest) -> MountInfo: ...

    def unmount(self, mount_id: str, *, force: bool = False) -> None: ...


def imgmount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgmount", description="Mount or inspect a virtual-machine disk image.")
    p.add_argument("image", nargs="?", help="the disk image file")
    p.add_argument("--info", action="store_true", help="show what the image holds; mount nothing")
    p.add_argument("--list", action="store_true", help="list what imgmount has mounted")
    p.add_argument("--rw", action="store_true", help="mount read-write (default: read-only)")
    p.add_argument("--volume", action="append", default=[], metavar="NAME",
                   help="mount only this volume (p1, vg/lv, disk: see --info); repeatable")
    p.add_argument("--mount-root", metavar="DIR", help="where to make mountpoints (default /run/media/USER)")
    p.add_argument("--format", choices=_Formats(), metavar="FORMAT",
                   help="the image format: %(choices)s (default: probed, then pinned)")
    p.add_argument("--snapshot", metavar="NAME", help="mount a qcow2 internal snapshot (read-only)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="how to attach the image")
    p.add_argument("-o", "--option", action="append", default=[], metavar="OPT",
                   help="an extra mount option from the allowed list (noatime, noexec, ...); repeatable")
    _common(p)
    return p


class _Formats:
    """The image formats, as ``--format``'s choices: read from :mod:`mountd.image.imageinfo` only when
    argparse looks at them (``--format`` given, ``--help``, a usage error), so the other commands do not
    import it. (The option has a metavar: argparse would otherwise list the choices as it builds the
    parser.)"""

    def __iter__(self) -> Iterator[str]:  # also what ``in`` uses
        from mountd.image.imageinfo import FORMATS  # noqa: PLC0415 - deferred, as the class says
        return iter(FORMATS)


def imgumount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgumount", description="Unmount an image mounted by imgmount.")
    p.add_argument("target", nargs="?", help="the image, a mountpoint, or a mount id")
    p.add_argument("--all", action="store_true", help="unmount everything imgmount has mounted")
    p.add_argument("--force", action="store_true", help="lazy unmount as a last resort when busy")
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--debug", action="store_true", help="log every command run, and tracebacks")


def imgmount_main(argv: Sequence[str] | None = None) -> int:
    args = imgmount_parser().parse_args(argv)
    if args.list:
        return _guarded("imgmount", args, _using(lambda m: m.mounts()), _mounts_json, _mounts_text)
    if not args.image:
        return _guarded("imgmount", args, _usage("name an image (or use --list)"), dict, str)
    image = os.path.abspath(args.image)
    if args.info:
        from mountd.engine.render import inspection_to_dict, render_tree  # noqa: PLC0415 - deferred, as _engine() says
        return _guarded("imgmount", args, lambda: _inspection(image, args.format), inspection_to_dict,
                        render_tree)
    request = MountRequest(image=image, read_only=not args.rw, volumes=tuple(args.volume),
                           mount_root=args.mount_root and os.path.abspath(args.mount_root),
                           format=args.format, snapshot=args.snapshot, backend=args.backend,
                           mount_options=tuple(args.option), owner=os.getuid())
    return _guarded("imgmount", args, _using(lambda m: m.mount(request)), _mount_json, _mount_text)


def imgumount_main(argv: Sequence[str] | None = None) -> int:
    args = imgumount_parser().parse_args(argv)
    if args.all == bool(args.target):
        return _guarded("imgumount", args, _usage("name one image, mountpoint or id, or --all"), dict, str)

    def unmount(mounter: Mounter) -> list[MountInfo]:
        targets = mounter.mounts() if args.all else [mounter.find(args.target)]
        for m in targets:
            mounter.unmount(m.id, force=args.force)
        return targets

    return _guarded("imgumount", args, _using(unmount), _mounts_json,
                    lambda ms: "\n".join(f"unmounted {m.image}" for m in ms) or "nothing was mounted")


def _using(action: Callable[[Mounter], T]) -> Callable[[], T]:
    """``action`` run against the daemon if there is one to talk to, else (as root) the in-process engine."""

    def run() -> T:
        client = None if os.environ.get(STATE_DIR_ENV) else DaemonClient.connect()
        if client is None:
            if os.geteuid() != 0:
                raise FailedError("the imgmount daemon is not reachable (no system bus, or imgmountd is not "
                                  "installed): install it with scripts/install, or run this as root")
            _logger().debug("no imgmount daemon to talk to: running the engine in-process")
            return action(_engine())
        try:
            return action(client)
        except DaemonUnavailableError as exc:
            if os.geteuid() != 0:
                raise
            _logger().warning("%s: running the engine in-process instead", exc.message)
            return action(_engine())
        finally:
            client.close()

    return run


def _engine() -> Engine:
    """The engine in-process, imported only here: a command that talks to the daemon needs none of it, and
    importing it costs a third of the command's start-up."""
    from mountd.engine.engine import Engine  # noqa: PLC0415

    _logger()  # the engine's warnings go to stderr
    return Engine()


def _inspection(image: str, fmt: str | None) -> Any:
    """``--info``: the image inspected in-process (deferred, as :func:`_engine` is)."""
    from mountd.engine.inspection import inspect_image  # noqa: PLC0415
    _logger()
    return inspect_image(image, fmt=fmt)


def _logger(*, debug: bool = False) -> logging.Logger:
    """The commands' logger, set up on first use: to stderr, WARNING and above, or everything with
    ``--debug`` (which sets it up first). Deferred: importing logging costs about 10 ms here (a third of a
    bare ``python -c pass``), and a command that has its answer from the daemon logs nothing."""
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    return logging.getLogger("mountd")


def _usage(message: str) -> Callable[[], Any]:
    def fail() -> Any:
        raise InvalidArgumentError(message)

    return fail


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
            _logger().debug("the system bus went away: %s", exc)
        bus.close()
        return None

    def close(self) -> None:
        self.bus.close()

    def _call(self, path: str, interface: str, member: str, signature: str = "",
              body: Sequence[Any] = ()) -> list[Any]:
        # A command run from a terminal lets polkit ask for a password, if the session has an agent.
        flags = ALLOW_INTERACTIVE_AUTHORIZATION if sys.stdin.isatty() else 0
        try:
            reply = self.bus.call(Call(BUS_NAME, path, interface, member, signature, body, flags))
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
        options = {"read-only": Variant("b", req.read_only), "backend": Variant("s", req.backend)}
        for key, value in (("volumes", list(req.volumes)), ("mount-options", list(req.mount_options))):
            if value:
                options[key] = Variant("as", value)
        for key, text in (("mount-root", req.mount_root), ("format", req.format), ("snapshot", req.snapshot)):
            if text is not None:
                options[key] = Variant("s", text)
        path = self._call(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}", [req.image, options])[0]
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
        _logger().debug("no system bus: %s", exc)
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


def _mount_json(m: MountInfo) -> dict[str, Any]:
    return asdict(m)


def _mounts_json(ms: list[MountInfo]) -> list[dict[str, Any]]:
    return [asdict(m) for m in ms]


def _mount_text(m: MountInfo) -> str:
    mode = "read-only" if m.read_only else "read-write"
    lines = [f"{m.image}: {m.format}, {mode}, via {m.backend} {m.device} (id {m.id})"]
    lines += [f"  {v.name:<16} {v.filesystem:<6} {v.mountpoint}" for v in m.volumes]
    lines += [f"  note: {name}: {note}" for name, note in m.notes]
    return "\n".join(lines)


def _mounts_text(ms: list[MountInfo]) -> str:
    return "\n".join(_mount_text(m) + ("" if m.state == "mounted" else f"\n  state: {m.state}")
                     for m in ms) or "nothing is mounted"


def _guarded(prog: str, args: argparse.Namespace, action: Callable[[], Any], as_json: Callable[[Any], Any],
             as_text: Callable[[Any], str]) -> int:
    """Run ``action`` and print its result; the one place where exceptions become messages."""
    if args.debug:
        _logger(debug=True)
    try:
        result = action()
    except MountdError as exc:
        return _fail(prog, args.json, exc.message, exc.exit_code, exc.dbus_name)
    except KeyboardInterrupt:
        return _fail(prog, args.json, "interrupted", 130, "Failed")
    except Exception:
        import uuid  # noqa: PLC0415 - only for an incident: it imports platform, a few ms of every start

        incident = uuid.uuid4().hex[:8]
        _logger().error("incident %s", incident, exc_info=args.debug)
        return _fail(prog, args.json, f"internal error (incident {incident}): run again with --debug and "
                     "report it", 1, "Failed")
    print(json.dumps(_shown(as_json(result)), indent=2) if args.json else display_name(as_text(result)))
    return 0


def _shown(value: Any) -> Any:
    """A JSON result with every string as valid UTF-8 (:func:`~mountd.model.display_name`), as over D-Bus."""
    if isinstance(value, str):
        return display_name(value)
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shown(v) for v in value]
    return value


def _fail(prog: str, as_json: bool, message: str, code: int, name: str) -> int:
    message = display_name(message)
    if as_json:
        print(json.dumps({"error": name, "message": message}))
    print(f"{prog}: {message}", file=sys.stderr)
    return code
