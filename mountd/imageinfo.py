"""What an image file is: its format, size and backing chain, each file validated before QEMU opens it.

The format found by probing the top image is pinned from then on, and every backing file's format comes from
its parent's header (or, for old images that record none, a probe of that file alone): QEMU never probes on
attach (design: "Images are untrusted input").
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any

from . import command
from .errors import CommandError, InvalidArgumentError, InvalidImageError, NotFoundError, UnsupportedError
from .imagerefs import has_vhd_footer, resolve_reference, scan_references

FORMATS = ("raw", "qcow2", "qcow", "vmdk", "vdi", "vhdx", "vpc", "cloop", "dmg", "parallels", "bochs", "qed")
READ_ONLY_FORMATS = ("cloop", "dmg", "bochs")
MAX_CHAIN = 64
INFO_TIMEOUT = 30.0


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


@dataclass(frozen=True)
class ImageInfo:
    chain: tuple[ImageFile, ...]  # chain[0] is the image itself, then its backing files in order

    @property
    def top(self) -> ImageFile:
        return self.chain[0]

    @property
    def format(self) -> str:
        return self.top.format

    @property
    def virtual_size(self) -> int:
        return self.top.virtual_size

    def files(self) -> list[str]:
        """Every file QEMU opens for this image: the chain, data files and extents."""
        out: list[str] = []
        for f in self.chain:
            out += [f.path, *([f.data_file] if f.data_file else []), *f.extents]
        return list(dict.fromkeys(out))


def image_path(path: str) -> str:
    """The absolute, resolved path of an image the caller named, or a clear error."""
    if not path or "\n" in path or "\0" in path:
        raise InvalidArgumentError("the image path is empty or contains a newline or NUL")
    if not os.path.isabs(path):
        raise InvalidArgumentError(f"the image path must be absolute: {path}")
    full = os.path.realpath(path)
    try:
        st = os.stat(full)
    except FileNotFoundError:
        raise NotFoundError(f"no such image: {path}") from None
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgumentError(f"{path} is a directory, not a disk image")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(f"{path} is not a regular file: only image files can be mounted")
    return full


def probe_image(path: str, *, fmt: str | None = None) -> ImageInfo:
    """Validate ``path`` and its whole backing chain and describe each file."""
    if fmt is not None and fmt not in FORMATS:
        raise InvalidArgumentError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    chain: list[ImageFile] = []
    seen: set[str] = set()
    current: str | None = image_path(path)
    while current is not None:
        if current in seen:
            raise InvalidImageError(f"the backing chain of {path} loops back to {current}")
        if len(chain) >= MAX_CHAIN:
            raise InvalidImageError(f"the backing chain of {path} is deeper than {MAX_CHAIN} files")
        seen.add(current)
        image = _probe_file(current, fmt)
        chain.append(image)
        current, fmt = image.backing, image.backing_format
    return ImageInfo(tuple(chain))


def _probe_file(path: str, fmt: str | None) -> ImageFile:
    refs = scan_references(path)  # before QEMU opens anything: it opens data files and extents at once
    data_file = resolve_reference(path, refs.data_file, "external data file") if refs.data_file else None
    extents = tuple(
        full for name in refs.extents if (full := resolve_reference(path, name, "VMDK extent")) != path
    )
    info = _qemu_img_info(path, fmt)
    if fmt is None and info.get("format") == "raw" and has_vhd_footer(path):
        info = _qemu_img_info(path, "vpc")
    found = str(info.get("format", ""))
    if found not in FORMATS:
        raise UnsupportedError(f"{path} is in format {found!r}, which imgmount does not support")
    if info.get("encrypted"):
        raise UnsupportedError(f"{path} is encrypted: imgmount cannot mount encrypted images")
    backing_name = info.get("backing-filename")
    backing = resolve_reference(path, str(backing_name), "backing file") if backing_name else None
    specific = info.get("format-specific", {}).get("data", {})
    return ImageFile(
        path=path,
        format=found,
        virtual_size=int(info["virtual-size"]),
        actual_size=int(info.get("actual-size", 0)),
        backing=backing,
        backing_format=refs.backing_format or info.get("backing-filename-format"),
        data_file=data_file,
        extents=extents,
        snapshots=tuple(
            Snapshot(str(s["id"]), str(s["name"]), int(s.get("vm-state-size", 0)))
            for s in info.get("snapshots", [])
        ),
        dirty=bool(info.get("dirty-flag") or specific.get("corrupt")),
    )


def _qemu_img_info(path: str, fmt: str | None) -> dict[str, Any]:
    argv = ["qemu-img", "info", "--output=json", "--force-share"]
    if fmt:
        argv += ["-f", fmt]
    try:
        out = command.run([*argv, path], timeout=INFO_TIMEOUT).stdout
    except CommandError as exc:
        reason = exc.stderr.strip().splitlines()[-1:] or ["unknown error"]
        raise InvalidImageError(f"QEMU cannot open {path}: {reason[0].removeprefix('qemu-img: ')}") from None
    try:
        info: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise InvalidImageError(f"qemu-img info gave no readable answer for {path}") from None
    return info


def block_options(info: ImageInfo, *, force_share: bool = False) -> str:
    """A ``--image-opts`` string that opens ``info``'s whole chain with every format pinned.

    Every file is opened with ``driver=file`` (no protocol), and each backing file is named explicitly rather
    than taken from the parent's header at open time.
    """
    opts: list[str] = []
    prefix = ""
    for image in info.chain:
        opts += [f"{prefix}driver={image.format}", f"{prefix}file.driver=file",
                 f"{prefix}file.filename={_escape(image.path)}"]
        if image.data_file:
            opts += [f"{prefix}data-file.driver=file",
                     f"{prefix}data-file.filename={_escape(image.data_file)}"]
        prefix += "backing."
    if force_share:
        opts.append("force-share=on")
    return ",".join(opts)


def _escape(value: str) -> str:
    return value.replace(",", ",,")
