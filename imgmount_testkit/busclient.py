"""A D-Bus client process for the daemon tests, run as another uid (``setpriv ... python -m`` this module).

    python -m imgmount_testkit.busclient ADDRESS

Reads one call per line on stdin, ``[path, interface, member, signature, args]`` in JSON (an ``a{sv}``
argument is an object of ``[signature, value]`` pairs), optionally followed by a list of files that this
process opens (as its uid) and sends with the call as unix fds (an ``h`` value is an index into it),
makes it, and answers one line per call:
``{"error": NAME or null, "body": [...]}`` (variants as their plain values). One process serves many calls,
so a test pays for one interpreter start per user, not per call.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.signature import get_signature_tree

BUS_NAME = "io.github.imgmount.Mountd1"


def _encode(value: Any, signature: str) -> Any:
    if signature == "a{sv}":
        return {k: Variant(sig, v) for k, (sig, v) in value.items()}
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


async def _call(bus: MessageBus, path: str, interface: str, member: str, signature: str,
                args: list[Any], files: list[str] | None = None) -> dict[str, Any]:
    types = [t.signature for t in get_signature_tree(signature).types]
    body = [_encode(v, t) for v, t in zip(args, types, strict=True)]
    try:
        fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files or []]
    except OSError as exc:
        return {"error": "open", "body": [exc.strerror]}
    try:
        reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                                       signature=signature, body=body, unix_fds=fds))
    finally:
        for fd in fds:
            os.close(fd)
    assert reply is not None
    error = reply.error_name if reply.message_type is MessageType.ERROR else None
    return {"error": error, "body": _plain(reply.body)}


async def main(address: str) -> None:
    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        print(json.dumps(await _call(bus, *json.loads(line))), flush=True)
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
