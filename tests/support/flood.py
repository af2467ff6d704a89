"""A flood of oversized calls to imgmountd, for the daemon tests: run as another uid (``setpriv ... python -m``
this module). Prints one JSON list: for each call, ``[error name or null, length of the reply's text]``.

    python -m tests.support.flood ADDRESS                 # oversized Unmount and Mount calls
    python -m tests.support.flood ADDRESS IMAGE COUNT [MEMBER,...]  # COUNT parallel calls of IMAGE, each of
                                                                   # the MEMBERs in turn (default: Inspect)
"""

from __future__ import annotations

import asyncio
import json
import sys

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from mountd.service.busfix import survive_full_socket

BUS_NAME = "io.github.imgmount.Mountd1"
MANAGER = "/io/github/imgmount/Mountd1"
MOUNTS = MANAGER + "/mounts/"
UNMOUNTS, MOUNTS_CALLS, HUGE_PATH, BIG_IMAGE = 16, 8, 4 << 20, 1 << 20


def calls() -> list[Message]:
    out = [Message(destination=BUS_NAME, path=MANAGER, interface=f"{BUS_NAME}.Manager", member="Unmount",
                   signature="oa{sv}", body=[MOUNTS + "a" * HUGE_PATH, {}]) for _ in range(UNMOUNTS)]
    out += [Message(destination=BUS_NAME, path=MANAGER, interface=f"{BUS_NAME}.Manager", member="Mount",
                    signature="sa{sv}", body=["/" + "x" * BIG_IMAGE, {}]) for _ in range(MOUNTS_CALLS)]
    return out


def inspects(image: str, count: int, members: list[str]) -> list[Message]:
    """``count`` calls of ``image``, each of ``members`` (Inspect, Mount) in turn."""
    return [Message(destination=BUS_NAME, path=MANAGER, interface=f"{BUS_NAME}.Manager",
                    member=members[i % len(members)], signature="sa{sv}", body=[image, {}]) for i in range(count)]


async def main(address: str, *inspect: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    survive_full_socket(bus)  # the attacker's dbus-fast has the same writer bug: her flood must get out
    members = inspect[2].split(",") if len(inspect) > 2 else ["Inspect"]
    messages = inspects(inspect[0], int(inspect[1]), members) if inspect else calls()
    replies = await asyncio.gather(*(asyncio.wait_for(bus.call(m), 60) for m in messages))
    print(json.dumps([[r.error_name, len(str(r.body[0])) if r.body else 0] for r in replies if r]))
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
