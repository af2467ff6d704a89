"""md arrays as this host has them (sysfs ``/sys/block/mdN``: ``slaves``, ``md/array_state``), and the arrays
a host's own incremental assembly started on imgmount's devices.

Debian's mdadm package installs 64-md-raid-assembly.rules: every new block device that blkid calls a
``linux_raid_member`` goes to ``mdadm --incremental``, which assembles (or holds, inactive, until its other
members come) an array on it, named md127, md126, ... Such an array keeps our nbd or loop device busy for
ever. systemd/60-imgmount.rules keeps blkid, and with it the assembly, off claimed devices; where that rule is
not installed, :func:`stop_host_arrays` stops those arrays at teardown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from mountd.errors import CommandError, ToolMissingError
from mountd.host import command
from mountd.host.processes import entries, text_of
from mountd.host.users import SYS_CLASS_BLOCK

log = logging.getLogger(__name__)

MD_TIMEOUT = 60.0
MAP_FILE = "/run/mdadm/map"  # mdadm's record of the arrays it assembled: "mdN version uuid path"


def md_devices() -> list[str]:
    """The md arrays the kernel has (sysnames ``mdN``), inactive ones included."""
    return sorted(name for name in entries(str(SYS_CLASS_BLOCK)) if name.startswith("md") and
                  os.path.isdir(SYS_CLASS_BLOCK / name / "md"))


def slaves(sysname: str) -> set[str]:
    return set(entries(str(SYS_CLASS_BLOCK / sysname / "slaves")))


def array_state(sysname: str) -> str:
    """``readonly``, ``clean``, ``active``, ``inactive``, ... ("" once it is gone)."""
    return text_of(str(SYS_CLASS_BLOCK / sysname / "md" / "array_state"))


def array_on(members: set[str]) -> str | None:
    """The array whose devices are exactly ``members`` (sysnames), if one is there."""
    return next((md for md in md_devices() if slaves(md) == members), None)


def sysname(node: str) -> str:
    """``loop3`` for ``/dev/loop3``, ``md127`` for ``/dev/md/name``."""
    return os.path.basename(os.path.realpath(node))


def ensure_md_module() -> None:
    """Load md (mdadm would have the kernel load it on first open, but not where autoloading is off)."""
    if not os.path.isdir("/sys/module/md_mod"):
        command.run(["modprobe", "md_mod"], timeout=MD_TIMEOUT)


def running_uuids() -> set[str]:
    """The uuids (mdadm's 8:8:8:8 form) of the arrays mdadm started on this host (its map file)."""
    lines = text_of(MAP_FILE).splitlines()[:4096]
    return {fields[2] for line in lines if len(fields := line.split()) >= 3}


def stop(md: str) -> None:
    command.run(["mdadm", "--stop", f"/dev/{md}"], timeout=MD_TIMEOUT)


def stop_host_arrays(nodes: Iterable[str]) -> list[str]:
    """Stop the arrays a host assembled on our devices ``nodes`` (and their partitions), before they are
    detached; an array that is itself one of ``nodes`` is ours, and its own layer stops it. Reads sysfs
    only, unless there is something to stop."""
    ours = {sysname(n) for n in nodes if n.startswith("/dev/")}
    ours |= {part for name in ours for part in _partitions(name)}
    stopped: list[str] = []
    for md in md_devices():
        members = slaves(md)
        if md in ours or not members or not members <= ours:
            continue
        try:
            stop(md)
        except (CommandError, ToolMissingError) as exc:
            log.warning("the host assembled %s on imgmount's devices, and it will not stop: %s", md,
                        exc.message)
            continue
        stopped.append(md)
    if stopped:
        log.warning("the host assembled %s on imgmount's devices (is 60-imgmount.rules installed?): stopped",
                    ", ".join(stopped))
    return stopped


def _partitions(disk: str) -> list[str]:
    return [name for name in entries(str(SYS_CLASS_BLOCK / disk))
            if name.startswith(disk) and os.path.exists(SYS_CLASS_BLOCK / disk / name / "partition")]
