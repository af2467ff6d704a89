"""Mount an image through imgmountd, list its volumes, unmount it: python3 examples/client.py IMAGE"""

import asyncio
import sys

from dbus_fast import BusType, Variant
from dbus_fast.aio import MessageBus

NAME, PATH = "io.github.imgmount.Mountd1", "/io/github/imgmount/Mountd1"


async def main(image: str) -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    manager_obj = bus.get_proxy_object(NAME, PATH, await bus.introspect(NAME, PATH))
    manager = manager_obj.get_interface(f"{NAME}.Manager")
    path = await manager.call_mount(image, {"read-only": Variant("b", True)})
    mount_obj = bus.get_proxy_object(NAME, path, await bus.introspect(NAME, path))
    mount = mount_obj.get_interface(f"{NAME}.Mount")
    for name, device, fstype, mountpoint in await mount.get_volumes():
        print(f"{name:<12} {fstype:<6} {device:<12} {mountpoint}")
    await mount.call_unmount({})


asyncio.run(main(sys.argv[1]))
