"""imgmountd's connection to the bus (:func:`connect`), with two faults of dbus-fast (5.2.0, the newest
release) worked around.

ObjectManager signals are sent from the manager's path, as the specification says (:class:`DaemonBus`).

A full socket is not a lost connection: dbus-fast's ``_MessageWriter`` sends on a non-blocking socket and
treats every exception from ``send`` as fatal (``bus._finalize``). When the kernel's socket buffer is full (a
burst of large replies, or any caller flooding us with calls), ``send`` raises ``BlockingIOError`` (EAGAIN)
and the daemon drops off the bus: any local user could knock it off. The writer already copes with a partial
send (it waits until the socket is writable and resumes where it stopped); a send that wrote nothing is the
same case with 0 bytes. So the writer gets a socket whose ``send`` answers 0 instead of raising EAGAIN.
``sendmsg`` (messages carrying unix fds, which this daemon never sends) is left alone: on a partial write the
writer would drop the fds.

This reaches into dbus-fast's private attributes (``bus._writer.sock``), checked here so that a release that
renames them fails at start-up, loudly, not at the first full socket.
"""

from __future__ import annotations

import socket
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from mountd.busnames import MANAGER_PATH, MOUNTS_PATH

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class PatientSocket:
    """A socket whose ``send`` reports a full buffer as 0 bytes written instead of raising."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def survive_full_socket(bus: MessageBus) -> None:
    """Give ``bus``'s writer (made by ``connect``) a :class:`PatientSocket`."""
    writer = getattr(bus, "_writer", None)
    if writer is None or not isinstance(getattr(writer, "sock", None), socket.socket):
        raise RuntimeError("dbus-fast's message writer is not what mountd.service.busfix expects: check the "
                           "workaround against this dbus-fast release")
    writer.sock = PatientSocket(writer.sock)


class DaemonBus(MessageBus):
    """dbus-fast sends ObjectManager signals from the object's own path; the specification (and GDBus
    clients such as file managers) expect them from the manager's path."""

    def send(self, msg: Message) -> Any:
        if msg.message_type is MessageType.SIGNAL and msg.interface == OBJECT_MANAGER \
                and (msg.path or "").startswith(MOUNTS_PATH + "/"):
            msg = Message.new_signal(MANAGER_PATH, OBJECT_MANAGER, msg.member or "", msg.signature, msg.body)
        return super().send(msg)


async def connect(where: str) -> MessageBus:
    if where in ("system", "session"):
        bus = DaemonBus(bus_type=BusType.SYSTEM if where == "system" else BusType.SESSION,
                        negotiate_unix_fd=True)
    else:
        bus = DaemonBus(bus_address=where, negotiate_unix_fd=True)
    await bus.connect()
    survive_full_socket(bus)  # dbus-fast would drop the connection on the first EAGAIN
    return bus
