"""What the engine takes and returns: plain data, importable without the engine (the commands talk to the
daemon with these and need none of the layers)."""

from __future__ import annotations

from dataclasses import dataclass

from .journal import MountRecord

BACKENDS = ("auto", "nbd", "loop", "fuse")


@dataclass(frozen=True)
class MountRequest:
    image: str
    read_only: bool = True
    volumes: tuple[str, ...] = ()  # empty: every volume holding a mountable filesystem
    mount_root: str | None = None
    format: str | None = None
    snapshot: str | None = None
    backend: str = "auto"
    mount_options: tuple[str, ...] = ()
    owner: int = 0


@dataclass(frozen=True)
class MountedVolume:
    name: str
    device: str
    filesystem: str
    mountpoint: str


@dataclass(frozen=True)
class MountInfo:
    id: str
    image: str
    format: str
    read_only: bool
    owner: int
    backend: str
    device: str
    volumes: tuple[MountedVolume, ...]
    state: str

    @classmethod
    def from_record(cls, record: MountRecord) -> MountInfo:
        # The whole disk's device: not a caller's QEMU server, which is only its source.
        disk = next((x for x in record.layers if x.volume == "" and x.kind not in ("mount", "server")), None)
        mount_layers = [x for x in record.layers if x.kind == "mount"]
        volumes = tuple(
            MountedVolume(m.volume, str(m.identity.get("device", "")), str(m.identity.get("fstype", "")),
                          str(m.identity.get("mountpoint", "")))
            for m in mount_layers
        )
        device = str(disk.identity.get("node", "")) if disk else ""
        return cls(record.id, record.image, record.format, record.read_only, record.owner, record.backend,
                   device, volumes, record.state)
