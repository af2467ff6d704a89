"""Formats whose header is at the end (QEMU's probe says raw), and QEMU's missing-module notes, which are
never the cause of a failure."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from mountd.host.forked import without_module_warnings
from mountd.image.imagerefs import trailer_format

NOTES = ("qemu-nbd: module block-block-dmg-bz2 not found, do you want to install qemu-block-extra package?\n"
         "qemu: module block-block-dmg-lzfse not found, do you want to install qemu-block-extra package?\n")


def _format_of(path: Path, data: bytes) -> str | None:
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return trailer_format(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("tail", "expected"), [
    (b"koly" + struct.pack(">II", 4, 512), "dmg"),
    (b"conectix", "vpc"),
    (b"koly" + struct.pack(">II", 3, 512), None),  # not UDIF version 4
    (b"koly", None),
    (b"", None),
])
def test_trailer_format(tmp_path: Path, tail: bytes, expected: str | None) -> None:
    assert _format_of(tmp_path / "disk", bytes(4096) + tail.ljust(512, b"\0")) == expected


def test_files_shorter_than_a_trailer_have_none(tmp_path: Path) -> None:
    assert _format_of(tmp_path / "tiny", b"koly") is None
    assert _format_of(tmp_path / "empty", b"") is None


def test_module_notes_are_dropped_and_the_cause_stays() -> None:
    cause = "qemu-nbd: Failed to blk_new_open 'x.dmg': Could not open 'x.dmg': Invalid argument"
    assert without_module_warnings(NOTES + cause + "\n") == cause
    assert without_module_warnings(NOTES) == ""
    assert without_module_warnings("qemu-nbd: a module of yours is broken") == "qemu-nbd: a module of yours is broken"
