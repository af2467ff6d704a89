"""Driving the kernel-side layers (``mountd.layers.nbd``, ``mountd.layers.dm``) in VM-lane tests: build a planned record,
attach it the way ``MountStack`` does (collecting each progress record), and always detach on the way out."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mountd.image.blockio import FileReader
from mountd.image.imageinfo import block_options, probe_image
from mountd.image.partitions import PartitionTable, read_partition_table
from mountd.layers.layer import Layer, LayerRecord, LayerState, layer_from_record
from mountd.layers.nbd import NbdLayer


def attach(kind: str, volume: str = "", **identity: Any) -> tuple[Layer[Any], list[LayerRecord]]:
    """Attach a planned layer; returns it and every record it reported through ``progress``."""
    seen: list[LayerRecord] = []
    layer = layer_from_record(LayerRecord(kind, volume, LayerState.ATTACHING, identity))

    def progress(record: LayerRecord) -> None:
        layer.record = record
        seen.append(record)

    try:
        layer.record = layer.attach(progress)
    except BaseException:
        layer.detach(force=True)  # what MountStack does with a failed attach
        raise
    return layer, seen


def nbd_identity(image: Path | str, *, read_only: bool = True, snapshot: str | None = None) -> dict[str, Any]:
    return {"image_opts": block_options(probe_image(str(image))), "read_only": read_only, "snapshot": snapshot}


@contextlib.contextmanager
def nbd_attached(image: Path | str, *, read_only: bool = True, snapshot: str | None = None) -> Iterator[NbdLayer]:
    layer, _ = attach("nbd", **nbd_identity(image, read_only=read_only, snapshot=snapshot))
    assert isinstance(layer, NbdLayer)
    try:
        yield layer
    finally:
        layer.detach()


def read_at(node: str, offset: int, length: int) -> bytes:
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def table_of(node: str) -> PartitionTable:
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        table = read_partition_table(FileReader(fd))
    finally:
        os.close(fd)
    assert table is not None, f"no partition table on {node}"
    return table


@contextlib.contextmanager
def partitions_attached(disk: str) -> Iterator[dict[int, Layer[Any]]]:
    """A ``partition`` layer for every partition our parser finds on ``disk``, detached on the way out."""
    layers: dict[int, Layer[Any]] = {}
    try:
        for part in table_of(disk).partitions:
            layers[part.number], _ = attach("partition", f"p{part.number}", parent=disk, number=part.number,
                                            start=part.start, size=part.size)
        yield layers
    finally:
        for layer in reversed(layers.values()):
            layer.detach()


def sys_attr(name: str, attr: str) -> str:
    return Path("/sys/class/block", name, attr).read_text().strip()
