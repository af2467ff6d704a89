"""Calls from the bus to the :class:`~mountd.service.daemon.Service`: a message handler in front of dbus-fast.

It closes the unix fds any message carries (no method takes one), admits each call for our interfaces per uid
(at most :data:`MAX_CALLS_IN_FLIGHT` in flight; root has no limit), and serves it in a task of its own
(:meth:`ApiInterface.handle`), its reply an incident if it cannot be sent. The engine's blocking work runs in
the worker threads of :func:`start_workers`, so other callers are served meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from mountd.errors import BusyError, InvalidArgumentError
from mountd.service import auth
from mountd.service.auth import Caller
from mountd.service.dbusapi import (
    ERROR_PREFIX,
    MANAGER_PATH,
    MOUNTS_PATH,
    ApiInterface,
    close_fds,
    incident_reply,
)

if TYPE_CHECKING:
    from mountd.service.daemon import Service

#: Calls one uid may have served at once: a desktop makes a handful; the rest are answered Busy at once, so
#: one user's flood cannot queue work (opener children, QEMU processes, threads) that delays everybody else.
MAX_CALLS_IN_FLIGHT = 16
WORKERS = 4 * MAX_CALLS_IN_FLIGHT


def start_workers() -> None:
    """Threads for the engine's blocking work: more than the calls one uid may have in flight, so a user whose
    mounts are stuck (until their deadline) cannot take every thread from the others."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=WORKERS))


class Dispatcher:
    """The message handler in front of dbus-fast: fd hygiene, then our calls, each in its own task."""

    def __init__(self, bus: MessageBus, service: Service) -> None:
        self.bus = bus
        self.service = service
        self.tasks: set[asyncio.Task[None]] = set()
        self.in_flight: dict[int, int] = {}  # uid -> calls being served

    def on_message(self, msg: Message) -> bool | None:
        target = self._target(msg) if msg.message_type is MessageType.METHOD_CALL else None
        served = target is not None and not self.service.closing
        if msg.unix_fds and not (served and target is not None and target.takes_fds(msg.member)):
            close_fds(msg.unix_fds)  # a method that takes none: or any caller can exhaust our descriptors
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        if target is None and not msg.unix_fds:
            return None  # introspection, properties, ObjectManager, Peer: dbus-fast's own handlers
        if target is None or self.service.closing:
            error = InvalidArgumentError(f"{msg.member} takes no file descriptors") if target is None else \
                BusyError("imgmountd is shutting down")
            self._reply(msg, Message.new_error(msg, ERROR_PREFIX + error.dbus_name, error.message))
            return True
        task = asyncio.get_running_loop().create_task(self._serve(target, msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def _target(self, msg: Message) -> ApiInterface | None:
        path = msg.path or ""
        iface: ApiInterface | None = self.service.manager if path == MANAGER_PATH else None
        if path.startswith(MOUNTS_PATH + "/"):
            iface = self.service.objects.get(path.removeprefix(MOUNTS_PATH + "/"))
        if iface is None:
            return None
        if msg.interface is None:
            return iface if msg.member in iface.api else None
        return iface if msg.interface == iface.name else None

    async def _serve(self, target: ApiInterface, msg: Message) -> None:
        self._reply(msg, await target.handle(msg, self.admit))

    def _reply(self, msg: Message, reply: Message) -> None:
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        try:
            self.bus.send(reply)  # marshalled here: a value D-Bus cannot carry raises now
        except Exception:
            self.bus.send(incident_reply(msg, f"the reply to {msg.member} from {msg.sender} cannot be sent"))

    @contextlib.asynccontextmanager
    async def admit(self, msg: Message) -> AsyncIterator[Caller]:
        """The caller, holding one of its uid's places among the calls in flight (root has no limit)."""
        caller = await auth.identify(self.bus, msg.sender or "")
        caller = replace(caller, interactive=bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION))
        held = self.in_flight.get(caller.uid, 0)
        if held >= MAX_CALLS_IN_FLIGHT and not caller.is_root:
            raise BusyError(f"uid {caller.uid} already has {held} calls in flight: wait for their replies")
        self.in_flight[caller.uid] = held + 1
        try:
            yield caller
        finally:
            if self.in_flight[caller.uid] == 1:
                del self.in_flight[caller.uid]
            else:
                self.in_flight[caller.uid] -= 1

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
