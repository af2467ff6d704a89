"""Who is calling the daemon, and may they (design: "Authorization").

- The caller is whoever the bus says sent the message: ``GetConnectionCredentials`` gives the uid, pid and
  groups the kernel vouched for when the caller connected (never anything the caller claims itself).
- uid 0 may do everything. Everyone else is asked about through polkit (``CheckAuthorization`` for a
  ``unix-process`` subject: pid, start time, uid) when polkitd is on the bus or can be activated; without
  polkit, only members of the group ``imgmount`` may call.
- A non-root caller mounts only files it can open itself: :mod:`mountd.host.opener` opens them as the caller,
  so the kernel decides (ACLs, LSMs, root-squashed NFS ...), not our reading of permission bits.
"""

from __future__ import annotations

import grp
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from mountd.errors import FailedError, NotAuthorizedError
from mountd.host.processes import start_time

log = logging.getLogger(__name__)

ACTION_MOUNT = "io.github.imgmount.mount"
ACTION_MOUNT_RW = "io.github.imgmount.mount-read-write"
ACTION_UNMOUNT_OTHERS = "io.github.imgmount.unmount-others"
FALLBACK_GROUP = "imgmount"
BUS_DRIVER = "org.freedesktop.DBus"
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
POLKIT_ALLOW_USER_INTERACTION = 1
# polkit is "not there" only when the bus says so; any other failure refuses the call (fail closed).
ABSENT = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")
@dataclass(frozen=True)
class Caller:
    """The sender of one call, as the bus knows it."""

    sender: str  # unique bus name
    uid: int
    pid: int
    gids: tuple[int, ...]  # primary and supplementary groups
    interactive: bool = False  # the call allows interactive authorization (a polkit agent may ask)

    @property
    def is_root(self) -> bool:
        return self.uid == 0


class BusCallError(Exception):
    """A call this daemon made on the bus came back as an error."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


async def bus_call(bus: MessageBus, msg: Message) -> list[object]:
    reply = await bus.call(msg)
    if reply is None:  # only for NO_REPLY_EXPECTED calls, which we never make
        raise FailedError(f"no reply from {msg.destination}")
    if reply.message_type is MessageType.ERROR:
        body = reply.body
        raise BusCallError(reply.error_name or "unknown", str(body[0]) if body else "")
    return list(reply.body)


async def identify(bus: MessageBus, sender: str) -> Caller:
    """The caller's credentials from the bus driver."""
    try:
        body = await bus_call(bus, Message(
            destination=BUS_DRIVER, path="/org/freedesktop/DBus", interface=BUS_DRIVER,
            member="GetConnectionCredentials", signature="s", body=[sender]))
    except BusCallError as exc:  # the caller has gone already
        raise NotAuthorizedError(f"the bus cannot tell who the caller is ({exc.text})") from None
    creds = body[0]
    assert isinstance(creds, dict)
    uid, pid = _value(creds, "UnixUserID"), _value(creds, "ProcessID")
    if not isinstance(uid, int) or not isinstance(pid, int):
        raise NotAuthorizedError("the bus does not report the caller's uid and pid")
    gids = _value(creds, "UnixGroupIDs")
    groups = tuple(int(g) for g in gids) if isinstance(gids, list) else _proc_groups(pid)
    return Caller(sender, uid, pid, groups)


def _value(creds: Mapping[str, Variant], key: str) -> object:
    v = creds.get(key)
    return v.value if isinstance(v, Variant) else None


def _proc_groups(pid: int) -> tuple[int, ...]:
    """Groups from /proc, for buses that do not report them (the pid is the bus's, so this is a fallback)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    except OSError:
        raise NotAuthorizedError("the calling process has gone") from None
    gid = int(lines["Gid"].split()[1])
    return (gid, *(int(g) for g in lines.get("Groups", "").split()))


def caller_start_time(pid: int) -> int:
    """polkit ties a pid to its start time so a reused pid is not trusted."""
    started = start_time(pid)
    if started is None:
        raise NotAuthorizedError("the calling process has gone")
    return started


class Authority:
    """Decides whether a caller may take an action: root, polkit, or the ``imgmount`` group."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    async def require(self, caller: Caller, action: str, *, interactive: bool = False,
                      details: Mapping[str, str] | None = None) -> None:
        if caller.is_root:
            return
        try:
            granted, challenge = await self._polkit(caller, action, interactive, details or {})
        except BusCallError as exc:
            if exc.name not in ABSENT:
                raise NotAuthorizedError(f"polkit could not decide on {action}: {exc.text}") from None
            self._require_group(caller, action)
            return
        if not granted:
            how = " (authentication is needed: call from a session with a polkit agent)" if challenge else ""
            raise NotAuthorizedError(f"polkit does not allow uid {caller.uid} to {_verb(action)}{how}")

    async def _polkit(self, caller: Caller, action: str, interactive: bool,
                      details: Mapping[str, str]) -> tuple[bool, bool]:
        subject = ["unix-process", {"pid": Variant("u", caller.pid),
                                    "start-time": Variant("t", caller_start_time(caller.pid)),
                                    "uid": Variant("i", caller.uid)}]
        flags = POLKIT_ALLOW_USER_INTERACTION if interactive else 0
        body = await bus_call(self.bus, Message(
            destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_IFACE, member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us", body=[subject, action, dict(details), flags, ""]))
        result = body[0]
        assert isinstance(result, list | tuple)  # (bba{ss}): is_authorized, is_challenge, details
        return bool(result[0]), bool(result[1])

    @staticmethod
    def _require_group(caller: Caller, action: str) -> None:
        try:
            gid = grp.getgrnam(FALLBACK_GROUP).gr_gid
        except KeyError:
            gid = None
        if action == ACTION_UNMOUNT_OTHERS or gid is None or gid not in caller.gids:
            members = "root" if action == ACTION_UNMOUNT_OTHERS else \
                f"root and members of group {FALLBACK_GROUP}"
            raise NotAuthorizedError(f"without polkit only {members} may {_verb(action)}: uid {caller.uid} "
                                     "may not")


def _verb(action: str) -> str:
    return {ACTION_MOUNT: "mount images", ACTION_MOUNT_RW: "mount images read-write",
            ACTION_UNMOUNT_OTHERS: "unmount other users' mounts"}.get(action, action)
