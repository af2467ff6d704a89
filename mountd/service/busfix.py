"""A workaround for dbus-fast's writer (5.2.0, the newest release): a full socket is not a lost connection.

dbus-fast's ``_MessageWriter`` sends on a non-blocking socket and treats every exception from ``send`` as
fatal (``bus._finalize``). When the kernel's socket buffer is full (a burst of large replies, or any caller
flooding us with calls), ``send`` raises ``BlockingIOError`` (EAGAIN) and the daemon drops off the bus: any
local user could knock it off. The writer already copes with a partial send (it waits until the socket is
writable and resumes where it stopped); a send that wrote nothing is the same case with 0 bytes. So the writer
gets a socket whose ``send`` answers 0 instead of raising EAGAIN. ``sendmsg`` (messages carrying unix fds,
which this daemon never sends) is left alone: on a partial write the writer would drop the fds.

This reaches into dbus-fast's private attributes (``bus._writer.sock``), checked here so that a release that
renames them fails at start-up, loudly, not at the first full socket.
"""

from __future__ import annotations

import socket
from typing import Any

from dbus_fast.aio import MessageBus


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
