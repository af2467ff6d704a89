"""The D-Bus API's names (design: "D-Bus API, version 1"), and a Mount object's properties as a MountInfo.

Both sides use these: the daemon (:mod:`mountd.service.dbusapi`, with dbus-fast) and the commands
(:mod:`mountd.cli.main`, with the small client :mod:`mountd.cli.client`). So this module imports no D-Bus
library.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mountd.model import MountedVolume, MountInfo

BUS_NAME = "io.github.imgmount.Mountd1"
MANAGER_PATH = "/io/github/imgmount/Mountd1"
MOUNTS_PATH = f"{MANAGER_PATH}/mounts"
MANAGER_IFACE = f"{BUS_NAME}.Manager"
MOUNT_IFACE = f"{BUS_NAME}.Mount"
ERROR_PREFIX = f"{BUS_NAME}.Error."


def mount_path(mount_id: str) -> str:
    return f"{MOUNTS_PATH}/{mount_id}"


def mount_info(path: str, props: Mapping[str, Any]) -> MountInfo:
    """A Mount object's properties, as plain values (variants unwrapped), as the engine's MountInfo."""
    volumes = tuple(MountedVolume(*(str(x) for x in v)) for v in props.get("Volumes", []))
    return MountInfo(path.rsplit("/", 1)[-1], str(props.get("Image", "")), str(props.get("Format", "")),
                     bool(props.get("ReadOnly", True)), int(props.get("Owner", 0)),
                     str(props.get("Backend", "")), str(props.get("Device", "")), volumes,
                     str(props.get("State", "")), str(props.get("ImageIdentity", "")),
                     tuple(dict(props.get("Notes", {})).items()))
