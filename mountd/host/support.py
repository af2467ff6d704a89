"""What this host can do for imgmount: the programs of :mod:`mountd.host.programs` it has and the kernel
features it offers, checked once when the daemon (or a command working in-process) starts, as blivet's
availability checks and stratisd's start-up verification do. The ``Backends`` property, the choice of
backend and ``--info``'s "this host" line all come from this one check."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from mountd.host import command
from mountd.host.programs import PROGRAMS, Program


@dataclass(frozen=True)
class HostSupport:
    """What this host can do for imgmount: the programs it lacks and the kernel features it has."""

    missing: tuple[Program, ...] = ()
    nbd: bool = False  # the nbd module is loaded, or modprobe can load it
    device_mapper: bool = False
    fuse: bool = False  # /dev/fuse
    programs: frozenset[str] = field(default_factory=lambda: frozenset(p.name for p in PROGRAMS))
    md: bool = False  # the md (software RAID) driver is loaded, or modprobe can load it

    def has(self, program: str) -> bool:
        return program in self.programs

    @property
    def fuse_exports(self) -> bool:
        """A ``qemu-storage-daemon`` FUSE export works here (the fuse backend, the recovery overlay)."""
        return self.fuse and self.has("qemu-storage-daemon")

    @property
    def md_assembly(self) -> bool:
        return self.md and self.has("mdadm")

    @property
    def lv_mapping(self) -> bool:
        return self.device_mapper and self.has("dmsetup")

    def backends(self) -> list[str]:
        """The backends this host can use, best first."""
        found = ["loop"]
        if self.nbd and self.has("qemu-nbd"):
            found.insert(0, "nbd")
        if self.fuse_exports:
            found.append("fuse")
        return found

    def summary(self) -> str:
        """The "what this host can do" line."""
        kernel = [name for name, ok in (("nbd", self.nbd), ("device-mapper", self.device_mapper),
                                        ("fuse", self.fuse)) if not ok]
        text = f"this host: backends {', '.join(self.backends())}"
        if kernel:
            text += f"; the kernel has no {', '.join(kernel)}"
        if self.missing:
            lacking = (f"{p.name} (package {p.package}: {p.used_for})" for p in self.missing)
            text += "; missing " + "; ".join(lacking)
        return text


def check_host() -> HostSupport:
    found = frozenset(p.name for p in PROGRAMS if command.have(p.name))
    return HostSupport(missing=tuple(p for p in PROGRAMS if p.name not in found),
                       nbd=Path("/sys/module/nbd").exists() or _can_load("nbd", found),
                       device_mapper=Path("/sys/class/misc/device-mapper").exists(),
                       fuse=Path("/dev/fuse").exists(), programs=found,
                       md=Path("/sys/module/md_mod").exists() or _can_load("md_mod", found))


@functools.lru_cache(maxsize=8)
def _can_load(module: str, programs: frozenset[str]) -> bool:
    """Asked once a process: whether a module can be loaded changes only with the packages installed."""
    if "modprobe" not in programs:
        return False
    return command.run(["modprobe", "--dry-run", "--quiet", module], check=False).status == 0
