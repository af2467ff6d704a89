"""The header scanners that run before QEMU opens an image: crafted bytes never crash or hang them."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mountd.errors import InvalidImageError, MountdError, UnsupportedError
from mountd.image.imagerefs import QCOW2_EXT_DATA_FILE, References, reference_path, scan_references


def qcow2_header(backing: bytes = b"", data_file: bytes = b"", version: int = 3) -> bytes:
    header_length = 104 if version >= 3 else 72
    ext = b""
    if data_file:
        ext = struct.pack(">II", QCOW2_EXT_DATA_FILE, len(data_file)) + data_file
        ext += b"\0" * (-len(ext) % 8)
    ext += struct.pack(">II", 0, 0)
    backing_offset = header_length + len(ext) if backing else 0
    head = b"QFI\xfb" + struct.pack(">IQI", version, backing_offset, len(backing))
    head = head.ljust(100, b"\0") + (struct.pack(">I", header_length) if version >= 3 else b"")
    return head[:header_length] + ext + backing


def scan(path: Path) -> References:
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan_references(fd, str(path))
    finally:
        os.close(fd)


def test_qcow2_backing_and_data_file(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(qcow2_header(b"base.img", b"data.raw"))
    assert scan(path) == References(backing="base.img", data_file="data.raw")


def test_qcow_version_1_has_no_extensions(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow"
    path.write_bytes(qcow2_header(b"base.img", version=1) + b"\xff" * 64)
    assert scan(path).backing == "base.img"


def test_backing_name_past_the_end_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(b"QFI\xfb" + struct.pack(">IQI", 3, 1 << 40, 100) + b"\0" * 200)
    with pytest.raises(InvalidImageError, match="outside the file"):
        scan(path)


def test_uml_cow_in_either_byte_order(tmp_path: Path) -> None:
    for magic in (b"OOOM", b"MOOO"):
        path = tmp_path / "x.cow"
        path.write_bytes(magic + b"\0" * 100)
        with pytest.raises(UnsupportedError, match="uml_moo"):
            scan(path)


def test_vmdk_descriptor_extents_and_parent(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"
    path.write_text('# Disk DescriptorFile\nparentFileNameHint="base.vmdk"\nRW 100 SPARSE "x-s001.vmdk"\n'
                    'RDONLY 50 FLAT "x-f001.vmdk" 0\nRW 10 ZERO\n')
    refs = scan(path)
    assert refs.extents == ("x-s001.vmdk", "x-f001.vmdk")
    assert (refs.backing, refs.backing_format) == ("base.vmdk", "vmdk")


def test_a_sparse_vmdk_is_its_own_extent_whatever_its_descriptor_names(tmp_path: Path) -> None:
    # As an OVA export leaves it: renamed, its embedded descriptor still naming the file it was written as.
    # QEMU takes a sparse file as its one extent and reads only the parent from that descriptor.
    header = bytearray(512)
    header[:4] = b"KDMV"
    struct.pack_into("<QQ", header, 28, 1, 1)  # the descriptor: sector 1, one sector long
    text = b'# Disk DescriptorFile\nparentFileNameHint="base.vmdk"\nRW 2048 SPARSE "disk1.vmdk"\n'
    path = tmp_path / "appliance-disk1.vmdk"
    path.write_bytes(bytes(header) + text.ljust(512, b"\0"))
    refs = scan(path)
    assert refs.extents == ()
    assert (refs.backing, refs.backing_format) == ("base.vmdk", "vmdk")


@pytest.mark.parametrize("name", ["json:{}", "nbd:host:1", "nbd+unix:///x", "file:/etc/passwd", "http://x/y"])
def test_protocols_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidImageError, match="protocol"):
        reference_path(str(tmp_path / "top.qcow2"), name, "backing file")


def test_plain_names_with_colons_after_a_slash_are_files(tmp_path: Path) -> None:
    assert reference_path(str(tmp_path / "top"), "./a:b/c", "backing file") == f"{tmp_path}/./a:b/c"
    assert reference_path(str(tmp_path / "top"), "/x/a:b", "backing file") == "/x/a:b"


MAGICS = st.sampled_from([b"QFI\xfb", b"QED\x00", b"KDMV", b"# Disk DescriptorFile", b""])


@settings(max_examples=300, deadline=500)
@given(magic=MAGICS, body=st.binary(max_size=2048))
def test_arbitrary_headers_never_crash(tmp_path_factory: pytest.TempPathFactory, magic: bytes,
                                       body: bytes) -> None:
    path = tmp_path_factory.mktemp("h") / "img"
    path.write_bytes(magic + body)
    with contextlib.suppress(MountdError):
        scan(path)
