"""Crafted input at imgmount's bounds (issue 9 #3): what ``imgmount --info`` costs on it, time and memory.

Each case is an image file built in a temporary directory (a PV whose metadata area holds a crafted text, see
``mountd.image.lvmlabel``), or an image path that is crafted itself. ``imgmount --info`` runs on it in a fresh
child process, as the command does (in-process, as root); the figures are its wall time and its own peak RSS
(``os.wait4``). Nothing is asserted: the tests check what a user sees, this measures what it costs.

    python scripts/bench_crafted.py [--tree DIR]    # DIR: another checkout to measure (default: this one)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from imgmount_testkit import images  # noqa: E402
from imgmount_testkit.bus import private_bus  # noqa: E402
from imgmount_testkit.client import client  # noqa: E402
from imgmount_testkit.daemon import Daemon, tmpfs  # noqa: E402
from imgmount_testkit.lvm_synth import (  # noqa: E402
    CRAFTED_PE_START,
    crafted_items,
    crafted_pv_uuid,
    crafted_vg,
    padded,
    pv_file,
    write_pv,
)
from imgmount_testkit.ova import octal, ovf_descriptor, tar_header  # noqa: E402
from mountd.image.lvmconfig import MAX_ITEMS, MAX_LVS  # noqa: E402
from mountd.image.lvmlabel import MAX_TEXT_SIZE  # noqa: E402
from mountd.image.ova import MAX_DISKS  # noqa: E402

# The child: ``imgmount`` with its arguments read from stdin (a 1 MiB path is longer than an argument may be).
CHILD = ("import json, sys; from mountd.cli.main import imgmount_main; "
         "sys.exit(imgmount_main(json.load(sys.stdin)))")
# Starts CHILD (its output to /dev/null) and prints its wall time, exit status and peak RSS in KiB. A
# process's peak RSS (ru_maxrss) counts the memory of the one it was forked from: the bench, holding the
# images' texts, would add its own; this small process in between does not.
LAUNCHER = f"""
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.executable, [sys.executable, "-c", {CHILD!r}])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.perf_counter() - start, os.waitstatus_to_exitcode(status), usage.ru_maxrss]))
"""


@dataclass(frozen=True)
class Run:
    case: str
    seconds: float
    peak_kib: int
    status: int
    said: str  # the first line on stderr, if any


def _text_of(unit: bytes, head: bytes = b"", tail: bytes = b"") -> bytes:
    """``head``, ``unit`` repeated, ``tail``: MAX_TEXT_SIZE bytes, the most text a metadata area may hold."""
    return head + unit * ((MAX_TEXT_SIZE - len(head) - len(tail)) // len(unit)) + tail


LINEAR_LVS = 1024
PV_COPIES = 8  # PVs of one VG in an image, each holding its own copy of the metadata text


def pvs_file(path: Path, text: bytes, count: int) -> Path:
    """A GPT disk image of ``count`` partitions, each a PV of the VG in ``text`` (which lists ``count`` PVs
    or more) with its own copy of ``text``: each copy is read and parsed."""
    part = CRAFTED_PE_START + (1 << 20)
    images.blank(path, (count * part) + (2 << 20))
    images.partition(path, "label: gpt\n" + f"size={part // 512}\n" * count)
    for i in range(count):
        write_pv(path, (1 << 20) + i * part, part, crafted_pv_uuid(i), text)
    return path


# name: what the image holds (a metadata text), or a path that is the crafted input itself
TEXTS: dict[str, Callable[[], bytes]] = {
    "8 MiB string of escapes": lambda: _text_of(b"\\\\", b'description = "', b'"\n'),
    "8 MiB of nested sections": lambda: _text_of(b"a {"),
    "8 MiB list": lambda: _text_of(b"0,", b"a = [", b"0]\n"),
    "8 MiB of keys": lambda: b"".join(b"k%07d = 0\n" % i for i in range(MAX_TEXT_SIZE // 13)),
    f"{MAX_ITEMS} keys (bound)": lambda: crafted_items(MAX_ITEMS),
    f"{MAX_ITEMS // 2} sections (bound)": lambda: crafted_items(MAX_ITEMS, sections=True),
    f"{MAX_LVS} LVs (bound)": lambda: crafted_vg(lvs=MAX_LVS),
    f"{MAX_LVS + 1} LVs": lambda: crafted_vg(lvs=MAX_LVS + 1),
    "8 MiB VG text (bound)": lambda: padded(crafted_vg(), MAX_TEXT_SIZE),
    # blkid probes each linear LV (thin ones are not probed): the cost per LV that is not the parser's
    f"{LINEAR_LVS} linear LVs": lambda: crafted_vg(lvs=LINEAR_LVS, thin=False),
}
def _ova(work: Path, ovf: str, disk: bytes = b"") -> str:
    """An OVA of ``ovf`` and, if given, ``disk`` as ``d.vmdk`` (ustar, the descriptor first)."""
    (work / "a.ovf").write_text(ovf)
    (work / "d.vmdk").write_bytes(disk)
    images.run(["tar", "--format=ustar", "-cf", str(work / "crafted.ova"), "-C", str(work), "a.ovf",
                "d.vmdk"])
    return str(work / "crafted.ova")


def _ova_of_disks(work: Path, count: int) -> str:
    """An OVA whose OVF lists ``count`` disks, each the same small streamOptimized VMDK."""
    images.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized",
                str(work / "small.vmdk"), "64M"])
    return _ova(work, ovf_descriptor("a", ["d.vmdk"], [(1, 64 << 20)] * count),
                (work / "small.vmdk").read_bytes())


def _raw_tar(work: Path, data: bytes) -> str:
    (work / "crafted.ova").write_bytes(data)
    return str(work / "crafted.ova")


PATHS: dict[str, Callable[[Path], str]] = {
    "path of 4096 slashes": lambda _: "/" * 4096,
    "path of 1 MiB": lambda work: str(work) + "/x" * (1 << 19),
    "OVA of 10^5 tar members": lambda work: _raw_tar(work, tar_header(b"a.ovf", octal(0)) * 100_000),
    "OVA member of 2^88 bytes": lambda work: _raw_tar(work, tar_header(b"a.ovf", b"\x80" + b"\xff" * 11)),
    "OVA, OVF of 5000 disks": lambda work: _ova(work, ovf_descriptor("a", ["d.vmdk"], [(1, 1)] * 5000)),
    f"OVA of {MAX_DISKS} disks (bound)": lambda work: _ova_of_disks(work, MAX_DISKS),
}


def run_info(case: str, image: str, tree: Path = ROOT) -> Run:
    """``imgmount --info image`` in a fresh child: wall time, the child's peak RSS, exit status, its word."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    launcher = subprocess.run([sys.executable, "-c", LAUNCHER], input=json.dumps(["--info", image]).encode(),
                              capture_output=True, env=env, cwd=tree, check=True)
    seconds, status, peak = json.loads(launcher.stdout)
    said = launcher.stderr[:4096].decode(errors="replace").partition("\n")[0]
    return Run(case, seconds, peak, status, said)


def crafted_inputs(work: Path) -> Iterator[tuple[str, str]]:
    """Every case and its image (or crafted path), each image built just before it is used and removed
    after."""
    for case, text in TEXTS.items():
        image = pv_file(work / "crafted.img", text())
        yield case, str(image)
        image.unlink()
    # One VG's text on each of many PVs: parsed once (lvmlabel.MetadataTexts).
    image = pvs_file(work / "pvs.img", crafted_vg(lvs=MAX_LVS, pvs=PV_COPIES), PV_COPIES)
    yield f"{PV_COPIES} PVs, {MAX_LVS} LVs", str(image)
    image.unlink()
    for case, path in PATHS.items():
        yield case, path(work)


def crafted_runs(tree: Path = ROOT) -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="imgmount-crafted-") as tmp:
        return [run_info(case, image, tree) for case, image in crafted_inputs(Path(tmp))]


def daemon_memory() -> list[tuple[str, float, int]]:
    """One imgmountd (as root, on a private bus) inspects every crafted input in turn: (case, seconds of its
    Inspect call, the daemon's RSS in KiB after it); first its RSS once started, last its peak (VmHWM). The
    bound: back under 64 MiB after any of them."""
    with private_bus() as bus, tmpfs() as run, client(bus.address) as c, \
            tempfile.TemporaryDirectory(prefix="imgmount-crafted-") as tmp:
        daemon = Daemon(bus, run).start()
        try:
            rows = [("started", 0.0, daemon.memory_kib())]
            for case, image in crafted_inputs(Path(tmp)):
                start = time.perf_counter()
                c.manager("Inspect", "sa{sv}", image, {})
                rows.append((case, time.perf_counter() - start, daemon.memory_kib()))
            rows.append(("peak (VmHWM)", 0.0, daemon.memory_kib("VmHWM")))
        finally:
            daemon.close(quiet=True)
    return rows


def crafted_info(tree: Path = ROOT) -> list[tuple[str, float, int]]:
    """(case, seconds, peak RSS in KiB) of ``imgmount --info`` on each crafted input."""
    return [(r.case, r.seconds, r.peak_kib) for r in crafted_runs(tree)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the checkout whose mountd runs (default: this)")
    args = parser.parse_args()
    print(f"## imgmount --info on crafted input ({args.tree})")
    print(f"{'case':<28} {'seconds':>8} {'peak RSS':>10}  exit  says")
    for r in crafted_runs(args.tree.resolve()):
        print(f"{r.case:<28} {r.seconds:7.2f}s {r.peak_kib // 1024:7d} MiB  {r.status:>4}  {r.said[:110]}")
    print_daemon_memory()


def print_daemon_memory() -> None:
    print("\n## imgmountd inspecting each crafted input in turn: its RSS after each call")
    for case, seconds, kib in daemon_memory():
        print(f"{case:<48} {seconds:7.3f}s {kib / 1024:7.1f} MiB")


if __name__ == "__main__":
    main()
