"""Images over 16 TiB (issue 9 item 7): larger than any file ext4 can hold, so nothing on the way may need a
file of the disk's (or a volume's) size. A 20 TiB qcow2, built as a person would (sfdisk and mkfs.ext4 on a
FUSE export of the qcow2), is inspected and mounted by the command, in-process as root: p1 is a partition of
17 TiB whose ext4 was never grown past its first 64 MiB, p2 a 64 MiB ext4 at 17 TiB."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.daemon import tmpfs
from mountd.errors import UnsupportedError
from tests.support import leftovers

MiB, TiB = images.MiB, 1 << 40
SIZE = 20 * TiB
START = 17 * TiB  # beyond 16 TiB: 2^32 blocks of 4 KiB, ext4's largest file
FS_SIZE = 64 * MiB
#: volume -> (offset, partition size, label); p1 is larger than any ext4 file, p2 starts past that size.
PARTS = {"p1": (MiB, START - MiB, "big"), "p2": (START, FS_SIZE, "far")}
FILES = {name: {"hello.txt": f"hello from {label}\n".encode(), "dir/blob.bin": hashlib.sha256(label.encode())
                .digest() * 4096} for name, (_, _, label) in PARTS.items()}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def far(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("far") / "far.qcow2"
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)])
    with images.fuse_export(image, "qcow2") as disk:
        images.partition(disk, "label: gpt\n" + "".join(f"start={offset // 512}, size={size // 512}, type=linux\n"
                                                        for offset, size, _ in PARTS.values()))
        for name, (offset, _, label) in PARTS.items():
            images.format_region(disk, offset, FS_SIZE, "ext4", label=label, files=FILES[name])
    return image


@pytest.fixture(scope="module")
def empty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("empty") / "empty.qcow2"
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)])
    return image


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """The in-process engine's state directory; the test must leave nothing behind."""
    before = leftovers.snapshot()
    yield tmp_path / "state"
    assert leftovers.snapshot().new_since(before) == []


def command(state: Path | None, *argv: str) -> subprocess.CompletedProcess[str]:
    """``imgmount``/``imgumount`` as a user runs them; with ``state``, in-process (no daemon involved)."""
    env = dict(os.environ)
    if state is not None:
        env["IMGMOUNT_STATE_DIR"] = str(state)
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env,
                          check=False, timeout=300)


def test_info_lists_partitions_beyond_16_tib(far: Path) -> None:
    text = command(None, "imgmount", "--info", str(far))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{far}: qcow2, 20 TiB virtual,")
    assert lines[1].startswith("GPT partition table, 512-byte sectors")
    assert lines[3].split()[:9] == ["├─p1", "1", "MiB", "17.0", "TiB", "Linux", "filesystem", "ext4", "big"]
    assert lines[4].split()[:9] == ["└─p2", "17", "TiB", "64", "MiB", "Linux", "filesystem", "ext4", "far"]
    data = json.loads(command(None, "imgmount", "--info", "--json", str(far)).stdout)
    assert data["virtual-size"] == SIZE
    assert [(v["name"], v["offset"], v["size"], v["filesystem"]["type"], v["filesystem"]["label"])
            for v in data["volumes"]] == [(name, *part[:2], "ext4", part[2]) for name, part in PARTS.items()]


def test_mount_reads_the_files_beyond_16_tib_and_unmount_leaves_nothing(far: Path, state: Path,
                                                                         tmp_path: Path) -> None:
    mounted = command(state, "imgmount", str(far), "--mount-root", str(tmp_path / "media"), "--json")
    assert mounted.returncode == 0, mounted.stderr
    info = json.loads(mounted.stdout)
    assert (info["format"], info["backend"], info["read_only"]) == ("qcow2", "fuse", True)
    assert [(v["name"], v["filesystem"]) for v in info["volumes"]] == [("p1", "ext4"), ("p2", "ext4")]
    for v in info["volumes"]:
        for name, data in FILES[v["name"]].items():
            assert (Path(v["mountpoint"]) / name).read_bytes() == data
        # Each loop device reads its partition at its offset in the export: p2's is past 16 TiB.
        loop = Path("/sys/block") / Path(v["device"]).name / "loop"
        assert int((loop / "offset").read_text()) == PARTS[v["name"]][0]
    gone = command(state, "imgumount", str(far))
    assert (gone.returncode, gone.stdout) == (0, f"unmounted {far}\n"), gone.stderr
    assert not any(Path(v["mountpoint"]).exists() for v in info["volumes"])
    assert json.loads(command(state, "imgmount", "--list", "--json").stdout) == []


def test_a_20_tib_raw_image_mounts_through_the_loop_backend(far: Path, state: Path, tmp_path: Path) -> None:
    """The same disk as a raw file, on a tmpfs (which allows files of any size a block device can have)."""
    with tmpfs() as where:
        raw = where / "far.raw"
        images.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(far), str(raw)])
        info = command(None, "imgmount", "--info", "--json", str(raw))
        assert [(v["name"], v["offset"], v["filesystem"]["label"]) for v in json.loads(info.stdout)["volumes"]] \
            == [(name, offset, label) for name, (offset, _, label) in PARTS.items()]
        mounted = command(state, "imgmount", str(raw), "--mount-root", str(tmp_path / "media"), "--json")
        assert mounted.returncode == 0, mounted.stderr
        out = json.loads(mounted.stdout)
        assert (out["format"], out["backend"]) == ("raw", "loop")
        for v in out["volumes"]:
            for name, data in FILES[v["name"]].items():
                assert (Path(v["mountpoint"]) / name).read_bytes() == data
        assert command(state, "imgumount", str(raw)).returncode == 0


def test_an_empty_20_tib_image_is_inspected_and_has_nothing_to_mount(empty: Path, state: Path,
                                                                     tmp_path: Path) -> None:
    text = command(None, "imgmount", "--info", str(empty))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].startswith(f"{empty}: qcow2, 20 TiB virtual,")
    assert text.stdout.splitlines()[2].split() == ["disk", "0", "B", "20", "TiB", "disk"]
    data = json.loads(command(None, "imgmount", "--info", "--json", str(empty)).stdout)
    assert [(v["name"], v["size"], v["filesystem"]) for v in data["volumes"]] == [("disk", SIZE, None)]
    refused = command(state, "imgmount", str(empty), "--mount-root", str(tmp_path / "media"))
    assert refused.returncode == UnsupportedError.exit_code
    assert refused.stderr.startswith("imgmount: no mountable filesystem in this image")
    assert refused.stderr.count("\n") == 1 and refused.stdout == ""
