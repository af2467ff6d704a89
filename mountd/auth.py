"""Who is calling the daemon, and may they (design: "Authorization").

- The caller is whoever the bus says sent the message: ``GetConnectionCredentials`` gives the uid, pid and
  groups the kernel vouched for when the caller connected (never anything the caller claims itself).
- uid 0 may do everything. Everyone else is asked about through polkit (``CheckAuthorization`` for a
  ``unix-process`` subject: pid, start time, uid) when polkitd is on the bus or can be activated; without
  polkit, only members of the group ``imgmount`` may call.
- A non-root caller mounts only files it can open itself: a child process takes the caller's uid and groups
  and opens each file, so the kernel decides (ACLs, LSMs, root-squashed NFS ...), not our reading of
  permission bits.
"""

from __future__ import annotations

import grp
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .errors import FailedError, NotAuthorizedError
from .processes import start_time

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
OPEN_CHECK_TIMEOUT = 20.0
# The opener runs as the caller, so its interpreter must be one every user may execute: the system's (a
# virtualenv's may sit in a directory only root can enter), else ours.
OPENER_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

# Run as the caller (uid, gid and groups already switched by subprocess): open each file named on stdin
# ("r PATH" or "w PATH", NUL-separated); O_NONBLOCK so a FIFO swapped in cannot block; report the first
# failure.
_OPENER = r"""
import os, stat, sys
for item in sys.stdin.buffer.read().split(b"\0"):
    if not item:
        continue
    mode, path = item[:1], item[2:]
    flags = (os.O_RDWR if mode == b"w" else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        sys.stdout.buffer.write(path + b"\0" + exc.strerror.encode())
        sys.exit(1)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        sys.stdout.buffer.write(path + b"\0" + b"not a regular file")
        sys.exit(1)
    os.close(fd)
"""


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


def check_openable(caller: Caller, files: Sequence[tuple[str, bool]]) -> None:
    """Raise NotAuthorizedError unless ``caller`` can open every (path, writable) in ``files`` itself.

    Blocking (a child process): run it in a worker thread.
    """
    if caller.is_root or not files:
        return
    request = b"".join((b"w " if write else b"r ") + os.fsencode(path) + b"\0" for path, write in files)
    try:
        proc = subprocess.run([OPENER_PYTHON, "-I", "-S", "-c", _OPENER], input=request, capture_output=True,
                              user=caller.uid, group=caller.gids[0] if caller.gids else caller.uid,
                              extra_groups=list(caller.gids), env={}, cwd="/", timeout=OPEN_CHECK_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        raise FailedError("checking whether the caller can open the image timed out") from None
    if proc.returncode == 0:
        return
    path, _, reason = proc.stdout.partition(b"\0")
    if not path:
        detail = proc.stderr.decode(errors="replace")[-200:]
        raise FailedError(f"checking the caller's access failed: {detail}")
    write = dict(files).get(os.fsdecode(path), False)
    raise NotAuthorizedError(f"you cannot open {os.fsdecode(path)} for {'writing' if write else 'reading'} "
                             f"({reason.decode(errors='replace')}): imgmount mounts only what you can open "
                             "yourself")
