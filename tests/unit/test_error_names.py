"""The D-Bus boundary's fixed list of error names: each domain error becomes one name, and the commands
turn each name back into one message and exit code; anything else is Failed and says nothing of the cause."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from dbus_fast import Message

from mountd.cli.daemonclient import ERRORS, _error
from mountd.errors import MountdError
from mountd.service.auth import Caller
from mountd.service.dbusapi import ERROR_PREFIX, ApiInterface, api_method


class _Raiser(ApiInterface):
    """Raises the error its caller names: the boundary's mapping for errors no real input can cause here
    (no free device, a timeout)."""

    def __init__(self) -> None:
        super().__init__("io.github.imgmount.Test")

    @api_method("Raise", (("name", "s"),))
    async def raise_(self, caller: Caller, name: str) -> None:
        raise ERRORS[name]("it went wrong") if name in ERRORS else RuntimeError("/secret/path leaked")


def test_every_error_name_maps_to_one_message_and_exit_code() -> None:
    @contextlib.asynccontextmanager
    async def identify(msg: Message) -> AsyncIterator[Caller]:
        yield Caller(msg.sender or "", 0, 1, (0,))

    def handled(name: str) -> Message:
        msg = Message(path="/x", interface="io.github.imgmount.Test", member="Raise", signature="s",
                      body=[name], serial=7, sender=":1.7")
        return asyncio.run(_Raiser().handle(msg, identify))

    for name, cls in ERRORS.items():
        reply = handled(name)
        assert (reply.error_name, reply.body) == (ERROR_PREFIX + name, ["it went wrong"])
        cli_error = _error(ERROR_PREFIX + name, "it went wrong")
        assert (type(cli_error), cli_error.exit_code, cli_error.message) == (cls, cls.exit_code, "it went wrong")
    unexpected = handled("Surprise")
    assert unexpected.error_name == ERROR_PREFIX + "Failed" and "/secret" not in unexpected.body[0]
    assert set(ERRORS) == {"InvalidArgument", "NotFound", "InvalidImage", "Unsupported", "InUse", "Busy",
                           "NoFreeDevice", "NotAuthorized", "Timeout", "Failed"}
    assert _error("org.freedesktop.DBus.Error.AccessDenied", "x").exit_code == 9
    assert _error("org.freedesktop.DBus.Error.NoReply", "x").exit_code == 10
    assert isinstance(_error("org.freedesktop.DBus.Error.Spawn.ChildExited", "x"), MountdError)
