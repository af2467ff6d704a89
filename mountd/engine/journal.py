"""The state journal: one JSON file per mount under the state directory (``/run/imgmount/`` by default).

Each layer records its identity *before* it creates a kernel object and again once it exists, so a crash at
any point leaves a record that says exactly what may exist (design: "Daemon life cycle"). Files are written
atomically: a temporary file, fsync, rename, fsync of the directory. ``/run`` is a tmpfs: what a record
describes dies with the kernel, and so does the record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mountd.errors import FailedError, NotFoundError
from mountd.layers.layer import LayerRecord, LayerState
from mountd.layers.mount import MountSpec
from mountd.layers.server import ServerSpec
from mountd.model import ImageMount, MountedVolume, MountInfo, MountState
from mountd.settings import DEFAULT_STATE_DIR


@dataclass(frozen=True)
class MountRecord(ImageMount):
    """A mount as the journal keeps it: its request's options and its layers, each with its identity."""

    options: dict[str, Any]
    layers: tuple[LayerRecord, ...] = ()
    state: MountState = MountState.MOUNTING
    #: "st_dev:st_ino" of the image file mounted: a mount is of a file, not of whatever a path names now
    #: ("" in records of older versions)
    image_id: str = ""

    @property
    def lock_key(self) -> str:
        """What :meth:`Journal.image_locked` serialises operations on this mount by."""
        return self.image_id or f"mount-{self.id}"

    def info(self) -> MountInfo:
        """What the API shows of this mount."""
        # The whole disk's device: not a caller's QEMU server, which is only its source.
        not_devices = (MountSpec.kind, ServerSpec.kind)
        disk = next((x for x in self.layers if x.volume == "" and x.kind not in not_devices), None)
        # Read field by field, not parsed as a plan: a record damaged by hand or by a crash is still shown
        # (as broken), so that it can be unmounted.
        mounts = [(x.volume, x.identity) for x in self.layers if x.kind == MountSpec.kind]
        volumes = tuple(MountedVolume(volume, str(m.get("device", "")), str(m.get("fstype", "")),
                                      str(m.get("mountpoint", ""))) for volume, m in mounts)
        device = disk.node if disk else ""
        notes = tuple((volume, str(m["note"])) for volume, m in mounts if m.get("note"))
        return MountInfo(self.id, self.image, self.format, self.read_only, self.owner, self.backend,
                         device, volumes, self.state, self.image_id, notes)

    def with_layer(self, layer: LayerRecord) -> MountRecord:
        """This record with ``layer`` added, or replacing the last layer of the same kind and volume."""
        layers = list(self.layers)
        if layers and (layers[-1].kind, layers[-1].volume) == (layer.kind, layer.volume) \
                and layers[-1].state == LayerState.ATTACHING:
            layers[-1] = layer
        else:
            layers.append(layer)
        return replace(self, layers=tuple(layers))

    def without_layer(self, layer: LayerRecord) -> MountRecord:
        return replace(self, layers=tuple(x for x in self.layers if x != layer))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountRecord:
        layers = tuple(LayerRecord.from_json(x) for x in data.pop("layers", ()))
        return cls(**{**data, "state": MountState(data.get("state", MountState.MOUNTING))}, layers=layers)


class Journal:
    def __init__(self, state_dir: str | Path = DEFAULT_STATE_DIR) -> None:
        self.root = Path(state_dir)
        self.mounts = self.root / "mounts"

    def claim(self, node: str) -> None:
        """Mark an nbd or loop device as ours before the kernel configures it (systemd/60-imgmount.rules
        reads the mark, so the host's LVM auto-activation and udisks leave the device alone)."""
        if name := _claimable(node):
            (self.root / "claimed").mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.root / "claimed" / name).touch()

    def release(self, node: str) -> None:
        if name := _claimable(node):
            with contextlib.suppress(FileNotFoundError):
                (self.root / "claimed" / name).unlink()

    def prune_claims(self) -> list[str]:
        """Remove the marks that no record names (a crash between a detach and its record's update): udev
        would tag another user's later device of that name as ours. Marks are made after their record is
        written, so one listed here before the records are read is never a mount still being made."""
        claimed = self.root / "claimed"
        marks = sorted(p.name for p in claimed.iterdir()) if claimed.is_dir() else []
        named = {_claimable(layer.node) for r in self.all() for layer in r.layers}
        orphans = [m for m in marks if m not in named]
        for name in orphans:
            with contextlib.suppress(FileNotFoundError):
                (claimed / name).unlink()
        return orphans

    def ensure(self) -> None:
        self.mounts.mkdir(parents=True, exist_ok=True, mode=0o700)

    def write(self, record: MountRecord) -> None:
        self.ensure()
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(dir=self.mounts, prefix=f".{record.id}.")
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.mounts / f"{record.id}.json")
        _fsync_dir(self.mounts)

    def remove(self, mount_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.mounts / f"{mount_id}.json").unlink()
            _fsync_dir(self.mounts)

    def read(self, mount_id: str) -> MountRecord:
        try:
            return MountRecord.from_json(json.loads((self.mounts / f"{mount_id}.json").read_text()))
        except FileNotFoundError:
            raise NotFoundError(f"no mount with id {mount_id}") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise FailedError(f"the state record of mount {mount_id} is unreadable: {exc!r}") from None

    def all(self) -> list[MountRecord]:
        if not self.mounts.is_dir():
            return []
        ids = sorted(p.stem for p in self.mounts.glob("*.json"))
        records = []
        for mount_id in ids:
            with contextlib.suppress(NotFoundError):  # removed by another process meanwhile
                records.append(self.read(mount_id))
        return records

    @contextlib.contextmanager
    def image_locked(self, key: str) -> Iterator[None]:
        """Serialise mounts and unmounts of one image (``key``: its "st_dev:st_ino") across processes, and
        only those: operations on other images go on meanwhile. The lock file is removed by its holder;
        a waiter that locked a file removed meanwhile tries again (the name now names another file)."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = locks / key.replace("/", "_")
        fd = _lock_file(path)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)


def _lock_file(path: Path) -> int:
    """An fd holding an exclusive flock on the file that ``path`` names when we return."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        os.close(fd)


def _claimable(node: str) -> str:
    name = os.path.basename(node)
    return name if node.startswith("/dev/") and name.startswith(("nbd", "loop", "md")) else ""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
