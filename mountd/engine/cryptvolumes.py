"""Encrypted volumes of an attached disk, opened by dm-crypt (LUKS) or dislocker (BitLocker) with the caller's
keys, and what they hold (issue 10, item 1).

The stack becomes partition -> dm-crypt -> LVM -> filesystem: each locked volume the caller gave a key for is
opened (:mod:`mountd.layers.crypt`, a layer of the volume's own name, above its partition), then the opened
device is read with our own parsers, as a whole disk is (:func:`mountd.engine.inspection.analyse_disk`:
filesystem probe, LVM label and metadata). The volume keeps its name (``p3``) and now shows what is inside
(``LVM2_member`` of ``vgubuntu``, or ``ext4``); the LVs inside join the layout (``vgubuntu/root``) and are
mapped by our own device-mapper tables on the crypt device, like any other LV: host VGs are never touched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace

from mountd.engine.inspection import DiskLayout, Volume, VolumeKind, analyse_disk
from mountd.engine.lvmapping import dm_name
from mountd.engine.unlocking import can_unlock, is_locked, key_needed, lock_kind
from mountd.engine.volumes import VolumeAttacher
from mountd.image.blockio import FileReader
from mountd.layers.bitlocker import BitLockerSpec
from mountd.layers.crypt import CryptSpec
from mountd.layers.loop import LoopSpec

BITLOCKER = "BitLocker"


def _opened_here(volume: Volume, attacher: VolumeAttacher) -> bool:
    """LUKS is opened here with dm-crypt, where device-mapper and cryptsetup are; else it is left to
    :mod:`mountd.engine.unlocking` (QEMU's luks driver for LUKS1, the error naming what is missing for LUKS2).
    BitLocker needs only FUSE."""
    return _is_bitlocker(volume) or (attacher.disk.device_mapper and attacher.host.has("cryptsetup"))


def _is_bitlocker(volume: Volume) -> bool:
    return volume.signature is not None and volume.signature.type == BITLOCKER


def unlock(attacher: VolumeAttacher, names: tuple[str, ...]) -> VolumeAttacher:
    """``attacher`` with every locked volume that the mount needs and has a key for unlocked, and its layout
    showing what they hold."""
    layout = attacher.layout
    for volume in _to_unlock(attacher, names):
        layout = _with_inside(layout, volume, _inside(attacher, volume))
    return replace(attacher, layout=layout)


def _to_unlock(attacher: VolumeAttacher, names: tuple[str, ...]) -> list[Volume]:
    """The locked volumes named; with no names, every locked volume this host unlocks (as a mount of every
    volume includes them: :func:`mountd.engine.unlocking.can_unlock`): each needs a key. With a name found
    only inside a locked volume (``vgubuntu/root``), every locked volume the caller gave a key for."""
    layout, keys = attacher.layout, attacher.request.keys
    locked = [v for v in layout.volumes if is_locked(v) and _opened_here(v, attacher)]
    inside_only = names and any(layout.volume(n) is None for n in names)
    if inside_only:
        return [v for v in locked if keys.for_volume(v.name)]
    wanted = [v for v in locked if v.name in names] if names else \
        [v for v in locked if can_unlock(v, attacher.host)]
    for v in wanted:
        if not keys.for_volume(v.name):
            raise key_needed(v)
    return wanted


def _inside(attacher: VolumeAttacher, volume: Volume) -> DiskLayout:
    """Open ``volume`` with the caller's keys and read what it holds."""
    secrets = attacher.request.keys.for_volume(volume.name)
    opener = _bitlocker if _is_bitlocker(volume) else _luks
    node = opener(attacher, volume, secrets)
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return analyse_disk(FileReader(fd))
    finally:
        os.close(fd)


def _luks(attacher: VolumeAttacher, volume: Volume, secrets: list[bytes]) -> str:
    """The opened LUKS volume's device-mapper node."""
    assert volume.signature is not None
    stack = attacher.stack
    spec = CryptSpec(attacher.node(volume), dm_name(f"imgmount-{stack.record.id}-{volume.name}"),
                     volume.signature.version, volume.signature.uuid, attacher.request.read_only)
    with _secret_files(secrets) as fds:
        return stack.push(spec.plan(volume.name), fds=fds).node


def _bitlocker(attacher: VolumeAttacher, volume: Volume, secrets: list[bytes]) -> str:
    """A loop device on the decrypted file that dislocker-fuse serves (no device-mapper needed)."""
    stack, read_only = attacher.stack, attacher.request.read_only
    where = stack.journal.root / "bitlocker"
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    spec = BitLockerSpec(attacher.node(volume), str(where / dm_name(f"{stack.record.id}-{volume.name}")),
                         read_only)
    with _secret_files([p + b"\n" for p in secrets]) as fds:  # dislocker reads one line
        decrypted = stack.push(spec.plan(volume.name), fds=fds).node
    return stack.push(LoopSpec(decrypted, 0, 0, read_only=read_only, qemu_locks=False).plan(volume.name)).node


@contextlib.contextmanager
def _secret_files(secrets: list[bytes]) -> Iterator[tuple[int, ...]]:
    """Each secret in a memfd (anonymous memory: no name, no disk, gone with its last descriptor)."""
    fds: list[int] = []
    try:
        for secret in secrets:
            fds.append(os.memfd_create("imgmount-key", os.MFD_CLOEXEC))
            os.write(fds[-1], secret)
        yield tuple(fds)
    finally:
        for fd in fds:
            os.close(fd)


def _with_inside(layout: DiskLayout, volume: Volume, inside: DiskLayout) -> DiskLayout:
    """``layout`` with ``volume`` showing what it holds, and the LVs inside it added. The LVs are no piece
    of the image's bytes (``offset`` None): they are reached through the crypt device only."""
    top = inside.volume("disk")
    unlocked = replace(volume, signature=top.signature if top else None, vg=top.vg if top else "",
                       pv=bool(top and top.pv), note=_unlocked_note(volume, inside, top))
    where = f"inside encrypted volume {volume.name}"
    lvs = tuple(replace(v, offset=None, unmapped=v.unmapped or where)
                for v in inside.volumes if v.kind == VolumeKind.LV) if inside.table is None else ()
    volumes = tuple(unlocked if v is volume else v for v in layout.volumes) + lvs
    return replace(layout, volumes=volumes, volume_groups=layout.volume_groups + inside.volume_groups)


def _unlocked_note(volume: Volume, inside: DiskLayout, top: Volume | None) -> str:
    what = f"unlocked {lock_kind(volume)}"
    if inside.table is not None:
        return f"{what}; it holds a partition table, which imgmount does not read inside encrypted volumes"
    return f"{what}; {top.note}" if top is not None and top.note else what
