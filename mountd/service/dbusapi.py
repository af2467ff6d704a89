"""The D-Bus API, version 1 (design: "D-Bus API, version 1"): names, the Manager and Mount interfaces, strict
option parsing, and the one error boundary.

dbus-fast does not tell a method who called it, so API methods are not dispatched by dbus-fast: the daemon's
message handler (:mod:`mountd.service.dispatch`) hands each call for these interfaces to
:meth:`ApiInterface.handle`, which checks the signature, resolves the caller and runs the method. ``handle``
is the only place where exceptions become D-Bus errors. dbus-fast still serves introspection, properties and
ObjectManager.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from dbus_fast import Message, Variant
from dbus_fast import introspection as intr
from dbus_fast.annotations import DBusBool, DBusObjectPath, DBusSignature, DBusStr, DBusUInt32
from dbus_fast.constants import ArgDirection, PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, dbus_signal

from mountd import __version__
from mountd.busnames import (
    BUS_NAME,
    ERROR_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    MOUNT_IFACE,
    MOUNTS_PATH,
    mount_info,
    mount_path,
)
from mountd.errors import InvalidArgumentError, MountdError
from mountd.model import MountInfo, display_name
from mountd.service.keyoptions import key_file_fd

if TYPE_CHECKING:
    from mountd.service.auth import Caller
    from mountd.service.daemon import Service

log = logging.getLogger(__name__)

# The API's names live in mountd.busnames (no dbus-fast there, for the commands): re-exported from here.
__all__ = [
    "BUS_NAME", "ERROR_PREFIX", "INSPECT_OPTIONS", "MANAGER_IFACE", "MANAGER_PATH", "MOUNTS_PATH",
    "MOUNT_IFACE", "MOUNT_OPTIONS", "STRING_LISTS", "UNMOUNT_OPTIONS", "Admit", "ApiInterface", "ApiMethod",
    "ManagerInterface", "MountInterface", "Strings", "Volumes", "api_method", "check_text", "error_reply",
    "incident_reply", "mount_info", "mount_path", "parse_options", "to_vardict", "to_variant",
    "volumes_value",
]

# Each method's options: key -> variant signature. Anything else is InvalidArgument.
MOUNT_OPTIONS = {"read-only": "b", "volumes": "as", "mount-root": "s", "format": "s", "snapshot": "s",
                 "backend": "s", "mount-options": "as", "passphrases": "a{ss}", "key-file": "h"}
INSPECT_OPTIONS = {"format": "s", "passphrases": "a{ss}", "key-file": "h"}
UNMOUNT_OPTIONS = {"force": "b"}
# Lists in Inspect's result whose elements are strings; every other list holds dictionaries.
STRING_LISTS = frozenset({"extents", "warnings", "physical-volumes", "logical-volumes", "backends",
                          "missing-programs"})

Volumes = Annotated[list[list[str]], DBusSignature("a(ssss)")]
Strings = Annotated[list[str], DBusSignature("as")]
#: Identifies the caller of one call and holds its place among the calls in flight until the block ends.
Admit = Callable[[Message], AbstractAsyncContextManager["Caller"]]


def error_reply(msg: Message, exc: MountdError) -> Message:
    return Message.new_error(msg, ERROR_PREFIX + exc.dbus_name, display_name(exc.message))


def incident_reply(msg: Message, what: str) -> Message:
    """Failed, with a short incident id for the caller; ``what`` and the traceback of the exception being
    handled go to the log, never to the caller."""
    incident = uuid.uuid4().hex[:8]
    log.exception("incident %s: %s", incident, what)
    return Message.new_error(msg, ERROR_PREFIX + "Failed", f"internal error (incident {incident}): the "
                             "daemon's log has the details")


# --- the error boundary -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiMethod:
    name: str
    in_args: tuple[tuple[str, str], ...]  # (name, signature)
    out_args: tuple[tuple[str, str], ...]
    fn: Callable[..., Awaitable[Any]]
    takes_fds: bool = False  # the call's unix fds go to ``fn`` (keyword ``fds``), closed after it
    @property
    def in_signature(self) -> str:
        return "".join(sig for _, sig in self.in_args)

    @property
    def out_signature(self) -> str:
        return "".join(sig for _, sig in self.out_args)

    def introspect(self) -> intr.Method:
        return intr.Method(self.name, [intr.Arg(s, ArgDirection.IN, n) for n, s in self.in_args],
                           [intr.Arg(s, ArgDirection.OUT, n) for n, s in self.out_args])


Args = tuple[tuple[str, str], ...]


def api_method(name: str, in_args: Args = (), out_args: Args = (),
               *, takes_fds: bool = False) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
    """Mark ``async def fn(self, caller, *args)`` as the D-Bus method ``name``."""

    def decorator(fn: Callable[..., Awaitable[Any]]) -> Any:
        fn.__dict__["api_method"] = ApiMethod(name, in_args, out_args, fn, takes_fds)
        return fn

    return decorator


class ApiInterface(ServiceInterface):
    """A ServiceInterface whose methods are served by :meth:`handle` (so they learn who called)."""

    api: ClassVar[dict[str, ApiMethod]] = {}
    constant: ClassVar[frozenset[str]] = frozenset()  # properties that never change once published
    signal_args: ClassVar[dict[str, tuple[str, ...]]] = {}  # argument names of each signal

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.api = {m.name: m for v in vars(cls).values() if (m := getattr(v, "api_method", None)) is not None}

    def takes_fds(self, member: str | None) -> bool:
        method = self.api.get(member or "")
        return method is not None and method.takes_fds

    def introspect(self) -> intr.Interface:
        found = super().introspect()
        found.methods = [m.introspect() for m in self.api.values()] + found.methods
        for prop in found.properties:
            if prop.name in self.constant:
                prop.annotations["org.freedesktop.DBus.Property.EmitsChangedSignal"] = "const"
        for sig in found.signals:
            for arg, name in zip(sig.args, self.signal_args.get(sig.name, ()), strict=True):
                arg.name = name
        return found

    async def handle(self, msg: Message, admit: Admit) -> Message:
        """Run one call. Every outcome is a reply: a result, a fixed error, or Failed with an incident id;
        every failure is logged once, at INFO for a refusal, with the traceback for an incident."""
        method = self.api.get(msg.member or "")
        try:
            if method is None:
                said = f"{self.name} has no method {msg.member}"
                log.info("%s from %s: UnknownMethod: %s", msg.member, msg.sender, said)
                return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", said)
            if msg.signature != method.in_signature:
                raise InvalidArgumentError(f"{method.name} takes arguments ({method.in_signature}), "
                                           f"not ({msg.signature})")
            if msg.unix_fds and not method.takes_fds:
                raise InvalidArgumentError(f"{method.name} takes no file descriptors")
            async with admit(msg) as caller:
                extra = {"fds": list(msg.unix_fds)} if method.takes_fds else {}
                result = await method.fn(self, caller, *msg.body, **extra)
            body = [] if not method.out_args else [result]
            return Message.new_method_return(msg, method.out_signature, body)
        except MountdError as exc:
            log.info("%s from %s: %s: %s", msg.member, msg.sender, exc.dbus_name, exc.message)
            return error_reply(msg, exc)
        except Exception:
            return incident_reply(msg, f"{self.name}.{msg.member} from {msg.sender} failed")
        finally:
            if method is not None and method.takes_fds:
                close_fds(msg.unix_fds)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --- options ----------------------------------------------------------------------------------------------


def parse_options(options: Mapping[str, Variant], spec: Mapping[str, str]) -> dict[str, Any]:
    """The options as plain values; unknown keys, wrong types and control characters are InvalidArgument."""
    out: dict[str, Any] = {}
    for key, variant in options.items():
        expected = spec.get(key)
        if expected is None:
            known = ", ".join(sorted(spec)) or "none"
            # not echoed: nobody has been authorized yet (issue 9: echo caller input only after that)
            raise InvalidArgumentError(f"unknown option (known options: {known})")
        if variant.signature != expected:
            raise InvalidArgumentError(f"option {key!r} must be of type {expected}, not {variant.signature}")
        texts = variant.value if expected == "as" else variant.value.keys() if expected == "a{ss}" else []
        for text in [variant.value] if expected == "s" else texts:
            check_text(text, f"option {key!r}")
        out[key] = variant.value
    return out


def check_text(text: str, what: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidArgumentError(f"{what} contains a newline or another control character")


def to_variant(value: Any, key: str = "") -> Variant:
    """Inspect's JSON-shaped result as variants: dict -> a{sv} (null values left out), str -> s, bool -> b,
    int -> x, lists -> as or aa{sv} (by key, so an empty list has the same type as a full one). Strings go as
    :func:`~mountd.model.display_name`: file names, labels and program names come from the image and the
    kernel, need not be UTF-8, and D-Bus carries nothing else."""
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", display_name(value))
    if isinstance(value, dict):
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, list | tuple):
        if key in STRING_LISTS:
            return Variant("as", [display_name(str(x)) for x in value])
        return Variant("aa{sv}", [to_vardict(x) for x in value])
    raise TypeError(f"cannot send {type(value).__name__} over D-Bus ({key})")


def to_vardict(data: Mapping[str, Any]) -> dict[str, Variant]:
    return {k: to_variant(v, k) for k, v in data.items() if v is not None}


# --- the interfaces ---------------------------------------------------------------------------------------


def _key_fd(method: str, options: dict[str, Any], fds: list[int]) -> int:
    """The descriptor of the ``key-file`` option (-1 without one); a call may send no other."""
    if len(fds) > ("key-file" in options):
        raise InvalidArgumentError(f"{method} takes no file descriptors but the one of its option key-file")
    return key_file_fd(options, fds)


class ManagerInterface(ApiInterface):
    constant = frozenset({"Version", "Backends"})
    signal_args = {"MountAdded": ("mount",), "MountRemoved": ("mount",)}

    def __init__(self, service: Service, backends: list[str]) -> None:
        super().__init__(MANAGER_IFACE)
        self.service = service
        self.backends = backends

    @api_method("Inspect", (("image", "s"), ("options", "a{sv}")), (("info", "a{sv}"),), takes_fds=True)
    async def inspect(self, caller: Caller, image: str, options: dict[str, Variant],
                      fds: list[int]) -> dict[str, Variant]:
        parsed = parse_options(options, INSPECT_OPTIONS)
        data = await self.service.inspect(caller, image, parsed, _key_fd("Inspect", parsed, fds))
        return to_vardict(data)

    @api_method("Mount", (("image", "s"), ("options", "a{sv}")), (("mount", "o"),), takes_fds=True)
    async def mount(self, caller: Caller, image: str, options: dict[str, Variant], fds: list[int]) -> str:
        parsed = parse_options(options, MOUNT_OPTIONS)
        info = await self.service.mount(caller, image, parsed, _key_fd("Mount", parsed, fds))
        return mount_path(info.id)

    @api_method("Unmount", (("mount", "o"), ("options", "a{sv}")))
    async def unmount(self, caller: Caller, path: str, options: dict[str, Variant]) -> None:
        parsed = parse_options(options, UNMOUNT_OPTIONS)
        await self.service.unmount(caller, self.service.id_of(path), force=bool(parsed.get("force", False)))

    @api_method("ListMounts", (), (("mounts", "ao"),))
    async def list_mounts(self, caller: Caller) -> list[str]:
        return [mount_path(i) for i in self.service.published()]

    @dbus_signal("MountAdded")
    def mount_added(self, path: str) -> DBusObjectPath:
        return path

    @dbus_signal("MountRemoved")
    def mount_removed(self, path: str) -> DBusObjectPath:
        return path

    @dbus_property(PropertyAccess.READ, name="Version")
    def version(self) -> DBusStr:
        return __version__

    @dbus_property(PropertyAccess.READ, name="Backends")
    def backends_property(self) -> Strings:
        return self.backends


class MountInterface(ApiInterface):
    """One mount; ``info`` is what the journal said at the last change, ``state`` as last verified."""

    constant = frozenset({"Image", "ImageIdentity", "Format", "ReadOnly", "Owner", "Backend", "Notes"})

    def __init__(self, service: Service, info: MountInfo, state: str) -> None:
        super().__init__(MOUNT_IFACE)
        self.service = service
        self.info = info
        self.state = state

    def update(self, info: MountInfo, state: str) -> None:
        changed = {} if info == self.info else {"Volumes": volumes_value(info),
                                                "Device": display_name(info.device)}
        if state != self.state:
            changed["State"] = state
        self.info, self.state = info, state
        if changed:
            self.emit_properties_changed(changed)

    @api_method("Unmount", (("options", "a{sv}"),))
    async def unmount(self, caller: Caller, options: dict[str, Variant]) -> None:
        parsed = parse_options(options, UNMOUNT_OPTIONS)
        await self.service.unmount(caller, self.info.id, force=bool(parsed.get("force", False)))

    @dbus_property(PropertyAccess.READ, name="Image")
    def image(self) -> DBusStr:
        return display_name(self.info.image)

    @dbus_property(PropertyAccess.READ, name="ImageIdentity")
    def image_identity(self) -> DBusStr:
        """The image file's "st_dev:st_ino": imgumount finds a mount by the file a path names now."""
        return self.info.image_id

    @dbus_property(PropertyAccess.READ, name="Format")
    def format(self) -> DBusStr:
        return self.info.format

    @dbus_property(PropertyAccess.READ, name="ReadOnly")
    def read_only(self) -> DBusBool:
        return self.info.read_only

    @dbus_property(PropertyAccess.READ, name="Owner")
    def owner(self) -> DBusUInt32:
        return self.info.owner

    @dbus_property(PropertyAccess.READ, name="Backend")
    def backend(self) -> DBusStr:
        return self.info.backend

    @dbus_property(PropertyAccess.READ, name="Device")
    def device(self) -> DBusStr:
        return display_name(self.info.device)

    @dbus_property(PropertyAccess.READ, name="Volumes")
    def volumes(self) -> Volumes:
        return volumes_value(self.info)

    @dbus_property(PropertyAccess.READ, name="Notes")
    def notes(self) -> Annotated[dict[str, str], DBusSignature("a{ss}")]:
        """Volume name -> what its mount does not show (a journal it could not replay without writing)."""
        return {display_name(k): display_name(v) for k, v in self.info.notes}

    @dbus_property(PropertyAccess.READ, name="State")
    async def state_property(self) -> DBusStr:
        return await self.service.refresh_state(self.info.id)


def volumes_value(info: MountInfo) -> list[list[str]]:
    """The ``Volumes`` property; names made from the image and the caller's paths, shown as valid UTF-8."""
    return [[display_name(x) for x in (v.name, v.device, v.filesystem, v.mountpoint)] for v in info.volumes]
