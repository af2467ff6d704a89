"""Blocking dbus-fast clients of the daemon on a private bus (:mod:`.bus`), in the test's own process.

- :class:`Client` (and :func:`client`, which closes it): calls on its own event loop; records the signals
  the daemon emits and waits for them, or for a bus name to be owned.
- :class:`Reply`: a method return or error, as the tests look at it; :func:`reply_of` makes one.
- :func:`call_message` and :func:`connect`: the raw pieces, for tests that send messages themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from imgmount_testkit.bus import TIMEOUT
from mountd.service.dbusapi import BUS_NAME, MANAGER_IFACE, MANAGER_PATH


@dataclass(frozen=True)
class Reply:
    error: str | None  # the D-Bus error name
    body: list[Any]

    @property
    def text(self) -> str:
        return str(self.body[0]) if self.error and self.body else ""

    def value(self) -> Any:
        assert self.error is None, f"{self.error}: {self.text}"
        return self.body[0] if self.body else None


def reply_of(msg: Message | None) -> Reply:
    assert msg is not None
    return Reply(msg.error_name if msg.message_type is MessageType.ERROR else None, list(msg.body))


def call_message(path: str, interface: str, member: str, signature: str = "", body: Sequence[Any] = (),
                 fds: Sequence[int] = ()) -> Message:
    return Message(destination=BUS_NAME, path=path, interface=interface, member=member, signature=signature,
                   body=list(body), unix_fds=list(fds))


async def connect(address: str) -> MessageBus:
    """A client connection (dbus-fast wants a running loop already to make one)."""
    return await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()


@dataclass
class Client:
    """A blocking client on its own event loop; ``signals`` collects what the daemon emits."""

    address: str
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    signals: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bus: MessageBus = self.run(connect(self.address))
        self.bus.add_message_handler(self._on_message)
        self._waiters: list[tuple[Callable[[Message], bool], asyncio.Future[Any]]] = []

    def run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.close()

    def call(self, path: str, interface: str, member: str, signature: str = "", body: Sequence[Any] = (),
             fds: Sequence[int] = ()) -> Reply:
        return reply_of(self.run(self.bus.call(call_message(path, interface, member, signature, body, fds))))

    def manager(self, member: str, signature: str = "", *body: Any) -> Reply:
        return self.call(MANAGER_PATH, MANAGER_IFACE, member, signature, body)

    def mount(self, image: str | Path, **options: Variant) -> Reply:
        return self.manager("Mount", "sa{sv}", str(image), options)

    def props(self, path: str, interface: str) -> dict[str, Any]:
        found = self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface]).value()
        return {k: v.value for k, v in found.items()}

    def prop(self, path: str, interface: str, name: str) -> Any:
        found = self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name]).value()
        return found.value

    def driver(self, member: str, signature: str = "", *body: Any) -> Any:
        msg = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                      interface="org.freedesktop.DBus", member=member, signature=signature, body=list(body))
        return reply_of(self.run(self.bus.call(msg))).value()

    def watch(self) -> None:
        """Record every signal the daemon sends from now on."""
        self.driver("AddMatch", "s", f"type='signal',sender='{BUS_NAME}'")

    def wait_signal(self, match: Callable[[Message], bool]) -> Message:
        """The first recorded signal that ``match``es, waiting for it if it has not come yet."""
        for msg in self.signals:
            if match(msg):
                return msg
        future: asyncio.Future[Message] = self.loop.create_future()
        self._waiters.append((match, future))
        result: Message = self.run(future)
        return result

    def wait_owner(self, name: str, *, owned: bool = True, timeout: float = TIMEOUT,
                   unless_exits: int | None = None) -> bool:
        """Until ``name`` has an owner (or none): the readiness systemd's Type=dbus waits for. With
        ``unless_exits`` (a pid), the wait also ends when that process exits: False then."""
        self.driver("AddMatch", "s", f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                                     f"arg0='{name}'")
        if bool(self.driver("NameHasOwner", "s", name)) == owned:
            return True
        future: asyncio.Future[Message | None] = self.loop.create_future()
        self._waiters.append((lambda m: m.member == "NameOwnerChanged" and bool(m.body[2]) == owned, future))
        if unless_exits is None:
            return self.run(future, timeout) is not None
        pidfd = os.pidfd_open(unless_exits)
        self.loop.add_reader(pidfd, _settle, future)
        try:
            return self.run(future, timeout) is not None
        finally:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        self.signals.append(msg)
        for match, future in list(self._waiters):
            if not future.done() and match(msg):
                future.set_result(msg)
                self._waiters.remove((match, future))


def _settle(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


@contextlib.contextmanager
def client(address: str) -> Iterator[Client]:
    c = Client(address)
    try:
        yield c
    finally:
        c.close()


def plain(value: Any) -> Any:
    """A reply's value with every Variant unwrapped, for comparing with plain data."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(x) for k, x in value.items()}
    if isinstance(value, list):
        return [plain(x) for x in value]
    return value
