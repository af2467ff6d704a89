"""Layers attached for real in tests: in this process (detached again whatever happens) or in a child process
that exits, to show that what a layer makes outlives the process that made it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mountd.layers.layer import Layer, LayerRecord, LayerState, layer_from_record

ROOT = Path(__file__).resolve().parents[2]

# The child attaches, prints the record and exits without detaching.
CHILD = """
import dataclasses, json, sys
import mountd.layers.fuse, mountd.layers.loop
from mountd.layers.layer import LayerRecord
from mountd.layers.layer import layer_from_record
layer = layer_from_record(LayerRecord(**json.load(sys.stdin)))
record = layer.attach(lambda r: None)
print(json.dumps(dataclasses.asdict(record)))
"""


def planned(kind: str, **identity: object) -> LayerRecord:
    return LayerRecord(kind, "", LayerState.ATTACHING, dict(identity))


@contextlib.contextmanager
def attached(record: LayerRecord) -> Iterator[Layer[Any]]:
    """Attach ``record``'s layer here; detach it on exit (forced, so a failing test leaves nothing)."""
    layer = layer_from_record(record)
    try:
        layer.record = layer.attach(lambda r: setattr(layer, "record", r))
        yield layer
    finally:
        layer.detach(force=True)


def attach_in_child(record: LayerRecord) -> LayerRecord:
    """Attach in a separate Python process that exits at once; return the record it made."""
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(asdict(record)), cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the child failed to attach: {proc.stderr.strip()}")
    return LayerRecord(**json.loads(proc.stdout))
