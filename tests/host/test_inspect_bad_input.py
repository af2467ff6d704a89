"""Untrusted and wrong input: each case is one clear error naming the cause, and nothing is left behind."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.inspection import inspect_image
from mountd.errors import (
    InvalidArgumentError,
    InvalidImageError,
    MountdError,
    NotFoundError,
    UnsupportedError,
)

MiB = images.MiB


def qcow2(path: Path, *, backing: str | None = None, backing_fmt: str = "raw", size: int = 16 * MiB,
          data_file: str | None = None) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u"]
    if backing is not None:
        argv += ["-b", backing, "-F", backing_fmt]
    if data_file is not None:
        argv += ["-o", f"data_file={data_file}"]
    images.run([*argv, str(path), str(size)])
    return path


def _set_backing_name(image: Path, name: str) -> None:
    """Rewrite the backing file name in a qcow2 header in place (what a crafted image would carry)."""
    with open(image, "r+b") as f:
        f.seek(8)
        offset, _ = struct.unpack(">QI", f.read(12))
        f.seek(8)
        f.write(struct.pack(">QI", offset, len(name)))
        f.seek(offset)
        f.write(name.encode())


@pytest.mark.parametrize(
    ("backing", "fmt", "error", "words"),
    [
        ("json:{\"file.driver\":\"nbd\",\"file.host\":\"localhost\"}", "raw", InvalidImageError, "protocol"),
        ("nbd:localhost:10809", "raw", InvalidImageError, "protocol"),
        ("http://example.invalid/disk.img", "raw", InvalidImageError, "protocol"),
        ("/dev/null", "raw", InvalidImageError, "not a regular file"),
        ("missing-base.img", "raw", InvalidImageError, "does not exist"),
    ],
)
def test_crafted_backing_file_is_refused(tmp_path: Path, backing: str, fmt: str, error: type[MountdError],
                                         words: str) -> None:
    top = qcow2(tmp_path / "top.qcow2", backing="placeholder-name-long-enough-for-any-test-value" * 2,
                backing_fmt=fmt)
    _set_backing_name(top, backing)
    with pytest.raises(error, match=words) as info:
        inspect_image(str(top))
    assert str(top) in str(info.value)


def test_backing_chain_that_loops_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcow2(a, backing="b.qcow2", backing_fmt="qcow2")
    qcow2(b, backing="a.qcow2", backing_fmt="qcow2")
    with pytest.raises(InvalidImageError, match="loops back"):
        inspect_image(str(a))


def test_external_data_file_on_a_device_is_refused_before_qemu_opens_it(tmp_path: Path) -> None:
    data = images.blank(tmp_path / "data.raw", 16 * MiB)
    top = qcow2(tmp_path / "top.qcow2", data_file=str(data))
    ins = inspect_image(str(top))  # a plain data file is fine ...
    assert ins.image.top.data_file == str(data)
    assert str(data) in ins.image.files()
    os.unlink(data)
    os.symlink("/dev/zero", data)  # ... one that leads to a device is not
    with pytest.raises(InvalidImageError, match=r"external data file .* is not a regular file"):
        inspect_image(str(top))


def test_vmdk_extent_on_a_device_is_refused(tmp_path: Path) -> None:
    desc = tmp_path / "disk.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 32768 FLAT "/dev/zero" 0\n')
    with pytest.raises(InvalidImageError, match=r"VMDK extent of .* is not a regular file"):
        inspect_image(str(desc))


def test_uml_cow_file_gets_a_clear_no_tool_reads_this_error(tmp_path: Path) -> None:
    cow = tmp_path / "root_fs.cow"
    cow.write_bytes(b"OOOM" + struct.pack(">I", 3) + b"\0" * 4096)
    with pytest.raises(UnsupportedError, match=r"User-Mode-Linux COW .* uml_moo"):
        inspect_image(str(cow))


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "missing", "relative", "newline"])
def test_wrong_paths(tmp_path: Path, kind: str) -> None:
    path = {"directory": str(tmp_path), "fifo": str(tmp_path / "fifo"), "device": "/dev/zero",
            "missing": str(tmp_path / "nope.qcow2"), "relative": "disk.img",
            "newline": str(tmp_path / "a\nb")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    expected = NotFoundError if kind == "missing" else InvalidArgumentError
    with pytest.raises(expected):
        inspect_image(path)


@pytest.mark.parametrize(
    ("offset", "data", "words"),
    [
        (200, None, "is corrupt: a qcow2 header extension runs past the header"),  # our header scan
        (40, struct.pack(">Q", 12345), "QEMU cannot open .*L1 table offset invalid"),  # caught by QEMU
    ],
    ids=["truncated-header", "l1-table-offset"],
)
def test_corrupt_qcow2_is_an_error_not_a_crash(tmp_path: Path, offset: int, data: bytes | None,
                                               words: str) -> None:
    image = qcow2(tmp_path / "t.qcow2", size=64 * MiB)
    with open(image, "r+b") as f:
        if data is None:
            f.truncate(offset)
        else:
            f.seek(offset)
            f.write(data)
    with pytest.raises(InvalidImageError, match=words) as info:
        inspect_image(str(image))
    assert str(image) in str(info.value)


def test_random_bytes_are_a_disk_with_nothing_on_it(tmp_path: Path) -> None:
    image = tmp_path / "noise.img"
    image.write_bytes(os.urandom(4 * MiB))
    ins = inspect_image(str(image))
    assert ins.image.format == "raw" and ins.table is None
    assert [(v.name, v.signature) for v in ins.volumes] == [("disk", None)]


def test_cli_error_is_one_line_with_exit_code(tmp_path: Path) -> None:
    imgmount = str(Path(sys.executable).parent / "imgmount")
    proc = subprocess.run([imgmount, "--info", str(tmp_path / "nope.qcow2")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == NotFoundError.exit_code
    assert proc.stderr == f"imgmount: no such image: {tmp_path / 'nope.qcow2'}\n"
    proc = subprocess.run([imgmount, "--info", "--json", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == InvalidArgumentError.exit_code
    assert '"error": "InvalidArgument"' in proc.stdout
