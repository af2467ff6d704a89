"""Volume groups over several PVs, each a region of one image exposed as a loop device, made by the LVM tools.

:func:`imgmount_testkit.images.make_lvm` covers one PV with default options; this drives the tools directly for
everything else (extent sizes, two metadata copies, several PVs, stripes, lvextend, renames) and reads back
what the tools report, in bytes, as JSON. Like images.py it needs no device-mapper: ``--driverloaded n``.
LVM's metadata backups and archives are switched off so that test VGs leave nothing under /etc/lvm.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgmount_testkit.images import LVM_ENV, loop, run

NO_BACKUP = "backup { backup = 0 archive = 0 }"


@dataclass(frozen=True)
class Region:
    offset: int
    size: int


@contextlib.contextmanager
def pv_loops(image: Path, regions: Sequence[Region]) -> Iterator[list[str]]:
    """One loop device per region, detached on exit."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(loop(image, r.offset, r.size)) for r in regions]


def lvm_options(devs: Sequence[str]) -> list[str]:
    return ["--devices", ",".join(devs), "--driverloaded", "n", "--config", NO_BACKUP]


def lvm(devs: Sequence[str], command: str, *args: str) -> str:
    """Run an LVM command that sees only ``devs``: ``lvm(devs, "lvcreate", "-L", "8m", ...)``."""
    return run([command, "-q", *lvm_options(devs), *args], env=LVM_ENV)


def report(devs: Sequence[str], command: str, fields: str, *args: str) -> list[dict[str, str]]:
    """Rows of ``pvs``/``vgs``/``lvs`` as JSON, sizes in bytes without suffix."""
    out = run([command, *lvm_options(devs), "--reportformat", "json", "--units", "b", "--nosuffix",
               "-o", fields, *args], env=LVM_ENV)
    key = "seg" if "--segments" in args else {"pvs": "pv", "vgs": "vg", "lvs": "lv"}[command]
    rows: list[dict[str, str]] = json.loads(out)["report"][0][key]
    return rows


def create_pvs(devs: Sequence[str], *pvcreate_args: str) -> None:
    lvm(devs, "pvcreate", *pvcreate_args, *devs)


def create_lv(devs: Sequence[str], vg: str, name: str, size: str, *args: str) -> None:
    """A metadata-only LV (no activation, no zeroing): ``args`` may name PVs to allocate from."""
    lvm(devs, "lvcreate", "-an", "-Zn", "-L", size, "-n", name, vg, *args)
