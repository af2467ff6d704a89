"""What an image file is: its format, size and backing chain, each file validated before QEMU opens it.

The format found by probing the top image is pinned from then on, and every backing file's format comes from
its parent's header (or, for old images that record none, a probe of that file alone): QEMU never probes on
attach (design: "Images are untrusted input").
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from mountd.errors import (
    CommandError,
    InvalidArgumentError,
    InvalidImageError,
    NotFoundError,
    OperationTimeoutError,
    UnsupportedError,
)
from mountd.host import command
from mountd.host.opener import OpenedFile, Opener, confined_argv, fd_path, in_kernel_tree
from mountd.host.qemuerrors import last_words, qemu_error
from mountd.host.qemusecret import SECRET_ID
from mountd.image.blockio import FileReader
from mountd.image.imagerefs import References, reference_path, scan_head, scan_references, trailer_format
from mountd.image.ova import OvaDisk, ova_disks
from mountd.image.tarheaders import Member

FORMATS = ("raw", "qcow2", "qcow", "vmdk", "vdi", "vhdx", "vpc", "cloop", "dmg", "parallels", "bochs", "qed")
READ_ONLY_FORMATS = ("cloop", "dmg", "bochs")
OVA = "ova"  # not a QEMU format: a tar of disks, each opened in place (:mod:`mountd.image.ova`)
#: The formats QEMU itself encrypts, and how: qcow2 with LUKS or the legacy AES, qcow (version 1) with AES.
ENCRYPTING_FORMATS = ("qcow2", "qcow")
MAX_CHAIN = 64
INFO_TIMEOUT = 30.0
HEAD_READ = 1 << 20  # of an OVA's disk, for the names it holds (a VMDK's descriptor is in its first sectors)


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    size: int


@dataclass(frozen=True)
class ImageFile:
    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing: str | None = None  # absolute path of the backing file
    backing_format: str | None = None  # as the header records it; None: probe that file alone
    data_file: str | None = None  # absolute path of a qcow2 external data file
    extents: tuple[str, ...] = ()  # absolute paths of VMDK extent files other than this one
    snapshots: tuple[Snapshot, ...] = ()
    dirty: bool = False
    encryption: str = ""  # QEMU's own encryption of this file: "luks", "aes" ("": none)
    fd: int = field(default=-1, compare=False, repr=False)  # open while the probe's Opener is
    data_fd: int = field(default=-1, compare=False, repr=False)
    identity: str = field(default="", compare=False)  # "st_dev:st_ino" of the file opened: what it *is*
    member: Member | None = None  # the bytes of ``path`` that hold this image (a disk in an OVA)


@dataclass(frozen=True)
class ImageInfo:
    chain: tuple[ImageFile, ...]  # chain[0] is the image itself, then its backing files in order
    disks: tuple[ContainedDisk, ...] = ()  # an OVA's disks (chain[0] is then the OVA, format "ova")

    @property
    def top(self) -> ImageFile:
        return self.chain[0]

    @property
    def format(self) -> str:
        return self.top.format

    @property
    def virtual_size(self) -> int:
        return self.top.virtual_size

    @property
    def encryption(self) -> str:
        """How QEMU encrypts this image ("luks", "aes"; "": not at all), as ``--info`` names it."""
        return next((f.encryption for f in self.chain if f.encryption), "")

    def files(self) -> list[str]:
        """Every file QEMU opens for this image: the chain, data files and extents."""
        out: list[str] = []
        for f in self.chain:
            out += [f.path, *([f.data_file] if f.data_file else []), *f.extents]
        return list(dict.fromkeys(out))


@dataclass(frozen=True)
class ContainedDisk:
    """One disk of an OVA: ``name`` is what its volumes' names start with (``disk1/p1``)."""

    name: str
    label: str  # the OVF's name for it
    info: ImageInfo


def image_path(path: str) -> str:
    """The absolute, resolved path of an image root names (root's own files only: a caller's are opened by
    :class:`~mountd.host.opener.Opener` as the caller), or a clear error."""
    with Opener() as opener:
        return opener.open(path, write=False).name


def probe_image(path: str, *, fmt: str | None = None, opener: Opener | None = None,
                write: bool = False) -> ImageInfo:
    """Open ``path`` and its whole backing chain with ``opener`` (as the caller it stands for) and describe
    each file. The descriptors stay with ``opener`` (each :class:`ImageFile` names its own); without one,
    root opens them and they are closed on return."""
    if fmt is not None and fmt not in (*FORMATS, OVA):
        raise InvalidArgumentError(f"unknown format {fmt[:40]!r}: use one of {', '.join((*FORMATS, OVA))}")
    if opener is None:
        with Opener() as own:
            return probe_image(path, fmt=fmt, opener=own, write=write)
    chain: list[ImageFile] = []
    seen: set[tuple[int, int]] = set()
    top = opener.open(path, write=write)
    ova = _probe_ova(top, opener, required=fmt == OVA, write=write) if fmt in (None, OVA) else None
    if ova is not None:
        return ova
    current: OpenedFile | None = top
    while current is not None:
        if (current.dev, current.ino) in seen:
            raise InvalidImageError(f"the backing chain of {path} loops back to {current.name}")
        if len(chain) >= MAX_CHAIN:
            raise InvalidImageError(f"the backing chain of {path} is deeper than {MAX_CHAIN} files")
        seen.add((current.dev, current.ino))
        image, current = _probe_file(current, fmt, opener, write=write and not chain)
        chain.append(image)
        fmt = image.backing_format
    return ImageInfo(tuple(chain))


def _probe_file(f: OpenedFile, fmt: str | None, opener: Opener, *,
                write: bool) -> tuple[ImageFile, OpenedFile | None]:
    """Describe one file of the chain (its own data file and extents opened ``write`` too) and open its
    backing file, which is only ever read."""
    refs = scan_references(f.fd, f.name)  # before QEMU opens anything: it opens data files and extents
    data = _open_reference(opener, f, refs.data_file, "external data file", write) if refs.data_file else None
    extents = [_open_reference(opener, f, name, "VMDK extent", write) for name in refs.extents]
    external = tuple(e.name for e in extents if (e.dev, e.ino) != (f.dev, f.ino))
    info = _qemu_img_info(opener, f, fmt, data, by_name=bool(external))
    pinned = trailer_format(f.fd) if fmt is None and info.get("format") == "raw" else None
    if pinned:
        info = _qemu_img_info(opener, f, pinned, data, by_name=False)
    found = _supported_format(info, f.name)
    specific = info.get("format-specific", {}).get("data", {})
    encryption = _encryption(f.name, found, info, specific)
    backing_name = refs.backing or info.get("backing-filename")
    backing = _open_reference(opener, f, str(backing_name), "backing file", False) if backing_name else None
    return ImageFile(
        path=f.name,
        format=found,
        virtual_size=int(info["virtual-size"]),
        actual_size=int(info.get("actual-size", 0)),
        backing=backing.name if backing else None,
        backing_format=refs.backing_format or info.get("backing-filename-format"),
        data_file=data.name if data else None,
        extents=external,
        snapshots=tuple(
            Snapshot(str(s["id"]), str(s["name"]), int(s.get("vm-state-size", 0)))
            for s in info.get("snapshots", [])
        ),
        dirty=bool(info.get("dirty-flag") or specific.get("corrupt")),
        encryption=encryption,
        fd=f.fd,
        data_fd=data.fd if data else -1,
        identity=f"{f.dev}:{f.ino}",
    ), backing


def _supported_format(info: dict[str, Any], name: str) -> str:
    found = str(info.get("format", ""))
    if found not in FORMATS:
        raise UnsupportedError(f"{name} is in format {found[:40]!r}, which imgmount does not support")
    return found


def _probe_ova(f: OpenedFile, opener: Opener, *, required: bool, write: bool) -> ImageInfo | None:
    """``f`` as an OVA, each disk probed in place; None if it is not one (an error if ``required``)."""
    disks = ova_disks(FileReader(f.fd), f.name)
    if disks is None:
        if required:
            raise InvalidImageError(f"{f.name} is not an OVA (a tar archive whose first file is the .ovf)")
        return None
    if write:
        raise UnsupportedError(f"{f.name} is an OVA, which imgmount mounts read-only: its disks cannot "
                               "grow inside the archive (extract one with tar -x to write to it)")
    deadline = time.monotonic() + INFO_TIMEOUT  # for all disks together: at most 64 of them, each a QEMU
    contained = tuple(ContainedDisk(d.name, d.label, _probe_member(f, d, opener, deadline)) for d in disks)
    top = ImageFile(path=f.name, format=OVA, virtual_size=sum(d.info.virtual_size for d in contained),
                    actual_size=os.fstat(f.fd).st_size, fd=f.fd, identity=f"{f.dev}:{f.ino}")
    return ImageInfo((top,), contained)


def _probe_member(f: OpenedFile, disk: OvaDisk, opener: Opener, deadline: float) -> ImageInfo:
    """One disk of an OVA, which must be whole in the archive: it may name no other file."""
    member, label = disk.member, f"disk {disk.name} ({disk.member.name[:200]}) of {f.name}"
    if scan_head(os.pread(f.fd, min(member.size, HEAD_READ), member.offset), label) != References():
        raise InvalidImageError(f"{label} names other files (a backing file, data file or extent): an "
                                "OVA's disks must be whole inside it")
    left = deadline - time.monotonic()
    if left <= 0:
        raise OperationTimeoutError(f"QEMU took more than {INFO_TIMEOUT:g} s to open the disks of {f.name}")
    info = _qemu_img_info(opener, f, None, None, by_name=False, member=member, timeout=left)
    if info.get("backing-filename"):
        raise InvalidImageError(f"{label} names a backing file: an OVA's disks must be whole inside it")
    if info.get("encrypted"):
        raise UnsupportedError(f"{label} is encrypted by QEMU, which imgmount does not unlock inside an OVA")
    specific = info.get("format-specific", {}).get("data", {})
    return ImageInfo((ImageFile(
        path=f.name, format=_supported_format(info, label), virtual_size=int(info["virtual-size"]),
        actual_size=member.size, dirty=bool(info.get("dirty-flag") or specific.get("corrupt")), fd=f.fd,
        identity=f"{f.dev}:{f.ino}", member=member),))


def _encryption(name: str, fmt: str, info: dict[str, Any], specific: dict[str, Any]) -> str:
    """QEMU's encryption of the file ("luks", "aes"), from ``qemu-img info``; "" if it has none."""
    if not info.get("encrypted"):
        return ""
    encrypt = specific.get("encrypt")
    method = str(encrypt.get("format", "")) if isinstance(encrypt, dict) else "aes" if fmt == "qcow" else ""
    if fmt not in ENCRYPTING_FORMATS or method not in ("luks", "aes"):
        raise UnsupportedError(f"{name} is encrypted in a way imgmount does not know ({fmt[:40]} "
                               f"{method[:40] or 'encryption'})")
    return method


def _open_reference(opener: Opener, image: OpenedFile, name: str, what: str, write: bool) -> OpenedFile:
    """Open a file that ``image``'s header names, as the caller; only a plain regular file will do."""
    path = reference_path(image.name, name, what)
    if in_kernel_tree(path):
        raise InvalidImageError(f"the {what} of {image.name} is not a regular file: {path[:200]} (nothing "
                                "under /proc, /sys or /dev is an image)")
    try:
        ref = opener.open(path, write=write, what=what)
    except NotFoundError:
        raise InvalidImageError(f"the {what} of {image.name} does not exist: {path}") from None
    except InvalidArgumentError:
        raise InvalidImageError(f"the {what} of {image.name} is not a regular file: {path}") from None
    if in_kernel_tree(ref.name):
        raise InvalidImageError(f"the {what} of {image.name} is not a regular file (it is under /proc, /sys "
                                "or /dev)")
    return ref


def _qemu_img_info(opener: Opener, f: OpenedFile, fmt: str | None, data: OpenedFile | None, *,
                   by_name: bool, member: Member | None = None,
                   timeout: float = INFO_TIMEOUT) -> dict[str, Any]:
    """``qemu-img info`` on the open file (run as the caller when ``opener`` is confined). A VMDK descriptor
    that names other extents is given by name: QEMU finds the extents relative to it."""
    opts = [f"driver={fmt}"] if fmt else []
    opts += _file_options("", f.name if by_name else f.proc_path, member)
    if data is not None:
        opts += ["data-file.driver=file", f"data-file.filename={data.proc_path}"]
    prefix = confined_argv(opener.creds) if opener.creds else []
    argv = [*prefix, "qemu-img", "info", "--output=json", "--force-share", "--image-opts", ",".join(opts)]
    fds = [f.fd, *([data.fd] if data else [])]
    try:
        out = command.run(argv, timeout=timeout, pass_fds=fds).stdout
    except CommandError as exc:
        raise qemu_error(last_words(exc.stderr, {f.proc_path: f.name}), f.name) from None
    try:
        info: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise InvalidImageError(f"qemu-img info gave no readable answer for {f.name}") from None
    return info


def block_options(info: ImageInfo, *, force_share: bool = False, by_fd: bool = False) -> str:
    """A ``--image-opts`` string that opens ``info``'s whole chain with every format pinned.

    Every file is opened with ``driver=file`` (no protocol), and each backing file is named explicitly rather
    than taken from the parent's header at open time. ``by_fd``: each file as ``/proc/self/fd/N`` of the
    descriptor the probe opened (the process must inherit :func:`chain_fds`), except a VMDK descriptor with
    extents of its own, which QEMU finds relative to the descriptor's name.
    """
    opts: list[str] = []
    prefix = ""
    for image in info.chain:
        by_name = not by_fd or image.fd < 0 or bool(image.extents)
        path = image.path if by_name else fd_path(image.fd)
        opts += [f"{prefix}driver={image.format}", *_file_options(prefix, path, image.member)]
        if image.encryption:  # the key itself comes by a secret object (mountd.host.qemusecret)
            opts += [f"{prefix}encrypt.format={image.encryption}", f"{prefix}encrypt.key-secret={SECRET_ID}"]
        if image.data_file:
            data = image.data_file if not by_fd or image.data_fd < 0 else fd_path(image.data_fd)
            opts += [f"{prefix}data-file.driver=file", f"{prefix}data-file.filename={_escape(data)}"]
        prefix += "backing."
    if force_share:
        opts.append("force-share=on")
    return ",".join(opts)


def chain_fds(info: ImageInfo) -> list[int]:
    """The descriptors :func:`block_options` ``by_fd`` names."""
    return [fd for image in info.chain for fd in (image.fd, image.data_fd) if fd >= 0]


def _file_options(prefix: str, path: str, member: Member | None) -> list[str]:
    """The ``file`` child: the file itself, or only a member's bytes of it, through a raw child pinned to
    their offset and size (QEMU 7.2's raw driver), so nothing is extracted or copied."""
    if member is None:
        return [f"{prefix}file.driver=file", f"{prefix}file.filename={_escape(path)}"]
    return [f"{prefix}file.driver=raw", f"{prefix}file.offset={member.offset}",
            f"{prefix}file.size={member.size}", f"{prefix}file.file.driver=file",
            f"{prefix}file.file.filename={_escape(path)}"]


def _escape(value: str) -> str:
    return value.replace(",", ",,")
