"""The whole-disk layer of a mount: which backend, and attaching it (design: "Block device backends").

- ``loop``: raw images straight onto a loop device, no QEMU process at all (the fastest path). The whole-image
  loop device also carries QEMU-compatible locks, so a VM cannot start on the image while we hold it.
- ``nbd``: the production path for every other format: ``qemu-nbd -c`` onto ``/dev/nbdN``.
- ``fuse``: hosts without the nbd module: ``qemu-storage-daemon`` exports the image as a raw file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mountd.engine.inspection import DiskLayout, analyse_disk
from mountd.engine.stack import MountStack
from mountd.errors import UnsupportedError
from mountd.host.nbddev import ensure_nbd_module
from mountd.host.opener import Credentials
from mountd.host.support import HostSupport
from mountd.image.blockio import FileReader
from mountd.image.imageinfo import ImageInfo, block_options, chain_fds
from mountd.layers.fuse import ExportSpec
from mountd.layers.loop import LoopSpec
from mountd.layers.nbd import NbdSpec
from mountd.layers.server import ServerSpec, client_options
from mountd.settings import run_dir


@dataclass(frozen=True)
class Disk:
    """The attached virtual disk."""

    backend: str
    node: str  # /dev/loopN, /dev/nbdN, or the FUSE export file
    offset_base: str  # what per-volume loop devices map at byte offsets (the image file for loop)
    kernel_partitions: bool  # the kernel exposes nodeNpK partition nodes (nbd with max_part > 0)
    device_mapper: bool  # LVs can be mapped with device-mapper
    offset_fds: tuple[int, ...] = ()  # the open image file, where offset_base is the image itself


def is_plain_raw(info: ImageInfo) -> bool:
    return info.format == "raw" and len(info.chain) == 1 and info.top.data_file is None \
        and info.top.member is None


def choose(requested: str, info: ImageInfo, host: HostSupport) -> str:
    if requested == "loop" and not is_plain_raw(info):
        raise UnsupportedError(f"the loop backend maps raw images only, and this one is {info.format}: "
                               "use --backend nbd or fuse (or auto)")
    if requested == "nbd" and "nbd" not in host.backends():
        raise UnsupportedError("this kernel has no nbd module: use --backend fuse (or auto)")
    if requested == "fuse" and not host.fuse_exports:
        raise UnsupportedError("the fuse backend needs /dev/fuse and qemu-storage-daemon "
                               "(Debian package qemu-system-common)")
    if requested != "auto":
        return requested
    if is_plain_raw(info):
        return "loop"
    if "nbd" in host.backends():
        return "nbd"
    if host.fuse_exports:
        return "fuse"
    raise UnsupportedError(f"{info.format} images need the nbd kernel module or FUSE with "
                           "qemu-storage-daemon, and this host has neither")


def attach_disk(stack: MountStack, backend: str, info: ImageInfo, *, read_only: bool, snapshot: str | None,
                host: HostSupport, confined: Credentials | None = None, name: str = "",
                key_fd: int = -1) -> Disk:
    """The whole disk, from the files the probe opened (``info``'s descriptors). For a ``confined`` caller
    every QEMU that parses the image runs as that caller (:mod:`mountd.layers.server`); root's side only
    reads NBD. ``name``: which disk of several (an OVA's ``disk2``), for the names of its export and socket.
    ``key_fd``: the memfd with the key of an image QEMU encrypted, for the QEMU that opens it.
    """
    dm, state_dir = host.lv_mapping, stack.journal.root
    if backend == "loop":
        top = (info.top.fd,) if info.top.fd >= 0 else ()
        spec = LoopSpec(info.top.path, 0, 0, read_only=read_only, qemu_locks=True, direct_io=True)
        layer = stack.push(spec.plan(), fds=top)
        return Disk(backend, layer.node, info.top.path, False, dm, top)
    source, keys = block_options(info), ((key_fd,) if key_fd >= 0 else ())
    own = f"{stack.record.id}-{name}" if name else stack.record.id
    if confined is not None:  # the caller's server opens the image (with the key), root's side reads NBD
        source = _caller_server(stack, info, read_only=read_only, snapshot=snapshot, creds=confined, own=own,
                                key_fd=key_fd)
        key_fd, keys = -1, ()
    if backend == "fuse":
        layer = stack.push(ExportSpec(source, export_path(state_dir, own), read_only,
                                      snapshot or "", info.virtual_size, key_fd=key_fd).plan(), fds=keys)
        return Disk(backend, layer.node, layer.node, False, dm)
    module = ensure_nbd_module()
    layer = stack.push(NbdSpec(source, read_only, snapshot or "", str(run_dir(state_dir, "nbd")),
                               key_fd).plan(), fds=keys)
    return Disk(backend, layer.node, layer.node, module.max_part > 0, dm)


def export_path(state_dir: Path, name: str) -> str:
    """Where a FUSE export named ``name`` goes: in the state directory's root-only ``exports``."""
    exports = state_dir / "exports"
    exports.mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(exports / f"{name}.raw")


def _caller_server(stack: MountStack, info: ImageInfo, *, read_only: bool, snapshot: str | None,
                   creds: Credentials, own: str, key_fd: int) -> str:
    """Serve the image with a QEMU running as the caller; the block options that read it."""
    if snapshot:
        raise UnsupportedError("only root can mount an internal snapshot for now: QEMU running as you "
                               "(qemu-storage-daemon) has no way to open one")
    sock = run_dir(stack.journal.root, "servers") / f"{own}.sock"
    spec = ServerSpec(block_options(info, by_fd=True), str(sock), read_only, creds, info.top.path, key_fd)
    layer = stack.push(spec.plan(), fds=(*chain_fds(info), *((key_fd,) if key_fd >= 0 else ())))
    return client_options(layer.node)


def analyse(disk: Disk) -> DiskLayout:
    """Parse what the attached disk holds, reading the attached node itself (no second QEMU process)."""
    fd = os.open(disk.node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return analyse_disk(FileReader(fd))
    finally:
        os.close(fd)
