"""What this host can do (issue 11 item 4): the backends and the "this host" line follow from one check of the
programs table and the kernel's features. The hosts are described, not probed: each is a HostSupport as the
start-up check would find it."""

from __future__ import annotations

from mountd.host.programs import PROGRAMS, package_of
from mountd.host.support import HostSupport

EVERYTHING = frozenset(p.name for p in PROGRAMS)


def host(*, lacking: tuple[str, ...] = (), nbd: bool = True, dm: bool = True, fuse: bool = True) -> HostSupport:
    return HostSupport(tuple(p for p in PROGRAMS if p.name in lacking), nbd, dm, fuse, EVERYTHING - set(lacking))


def test_a_full_host_has_every_backend_best_first() -> None:
    full = host()
    assert full.backends() == ["nbd", "loop", "fuse"]
    assert full.lv_mapping and full.fuse_exports
    assert full.summary() == "this host: backends nbd, loop, fuse"


def test_this_development_machine_has_loop_and_fuse_only() -> None:
    small = host(nbd=False, dm=False)
    assert small.backends() == ["loop", "fuse"] and not small.lv_mapping
    assert small.summary() == "this host: backends loop, fuse; the kernel has no nbd, device-mapper"


def test_a_missing_program_takes_away_what_needs_it_and_names_its_package() -> None:
    bare = host(lacking=("qemu-nbd", "qemu-storage-daemon", "dmsetup"))
    assert bare.backends() == ["loop"] and not bare.lv_mapping and not bare.fuse_exports
    assert "missing qemu-nbd (package qemu-utils: the nbd backend" in bare.summary()
    assert "dmsetup (package dmsetup: logical volumes through device-mapper)" in bare.summary()


def test_every_program_names_its_debian_package() -> None:
    assert all(p.package and p.used_for for p in PROGRAMS)
    assert package_of("qemu-storage-daemon") == "qemu-system-common" and package_of("sfdisk") == "fdisk"
    assert package_of("no-such-tool") == "no-such-tool"
