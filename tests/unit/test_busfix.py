"""dbus-fast's real message writer over a real socket whose buffer is full: the stock socket makes it drop the
connection (the bug), ours makes it wait and deliver every byte. The bus object is a stand-in (named
``StandInBus``): a real dbus-daemon drains its socket too fast to fill it at a chosen moment."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from typing import cast

from dbus_fast import Message
from dbus_fast.aio.message_bus import _MessageWriter

from mountd.service.busfix import PatientSocket

BIG = 4 << 20  # more than a unix socket buffers


@dataclass
class StandInBus:
    """The attributes _MessageWriter reads from a MessageBus, and a record of _finalize."""

    _sock: socket.socket
    _loop: asyncio.AbstractEventLoop
    _negotiate_unix_fd: bool = False
    unique_name: str = ":1.1"
    _user_disconnect: bool = False
    finalized: list[Exception] = field(default_factory=list)

    @property
    def _fd(self) -> int:
        return self._sock.fileno()

    def _finalize(self, err: Exception) -> None:
        self.finalized.append(err)


def message(n: int) -> Message:
    return Message.new_signal("/x", "io.github.imgmount.Test", "Big", "s", [chr(ord("a") + n) * BIG])


async def write_two(patient: bool) -> tuple[list[Exception], int]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    bus = StandInBus(ours, asyncio.get_running_loop())
    writer = _MessageWriter(bus)  # type: ignore[arg-type]
    if patient:
        # What mountd.service.busfix.survive_full_socket does; PatientSocket stands in for the socket by duck typing.
        writer.sock = cast(socket.socket, PatientSocket(ours))
    expected = sum(len(m._marshall(False)) for m in (message(0), message(1)))
    writer.schedule_write(message(0))
    writer.schedule_write(message(1))  # the buffer is full by now: EAGAIN on the spot
    received = 0
    peer.setblocking(False)
    deadline = time.monotonic() + 10
    while received < expected and not bus.finalized and time.monotonic() < deadline:
        await asyncio.sleep(0)  # one turn of the loop: the writer's writability callback runs
        with contextlib.suppress(BlockingIOError):
            received += len(peer.recv(1 << 20))
    ours.close()
    peer.close()
    return bus.finalized, received - expected


def test_stock_writer_drops_the_connection_on_a_full_socket() -> None:
    finalized, _ = asyncio.run(write_two(patient=False))
    assert finalized and isinstance(finalized[0], BlockingIOError)


def test_patient_socket_waits_and_delivers_everything() -> None:
    finalized, missing = asyncio.run(write_two(patient=True))
    assert finalized == [] and missing == 0


def test_patient_socket_passes_everything_else_through() -> None:
    a, b = socket.socketpair()
    try:
        assert PatientSocket(a).fileno() == a.fileno()
        assert PatientSocket(a).send(b"x") == 1 and b.recv(1) == b"x"
    finally:
        a.close()
        b.close()
