"""Apple DMG images on Debian 12: Debian's QEMU prints "module block-block-dmg-bz2 not found" on every DMG open,
and ``qemu-nbd --fork`` exits 1 whenever its server printed anything, although the server runs. The images
are UDZO DMGs from our UDIF writer (qemu-img cannot write DMG), checked against QEMU itself."""

from __future__ import annotations

import json
import os
import plistlib
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imgmount_testkit import images, udif
from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import OtherUser, servers_of
from mountd.errors import CommandError, InvalidImageError
from mountd.host.forked import run_forked, serving_pid
from mountd.host.processes import is_alive, start_time, stop_process
from mountd.image.imageinfo import probe_image
from mountd.image.nbdclient import open_image
from mountd.service.dbusapi import MOUNT_IFACE
from tests.support.daemon_calls import error, v
from tests.support.guests import check_files
from tests.support.macdisk import MacDisk, gpt_dmg, plain_dmg

BIN = Path(sys.executable).parent
MODULE_NOTE = "module block-block-dmg-bz2 not found"


@pytest.fixture(scope="module")
def mac(shared: Path) -> MacDisk:
    (shared / "mac").mkdir()
    return gpt_dmg(shared / "mac")


@pytest.fixture(scope="module")
def plain(shared: Path) -> MacDisk:
    (shared / "plain").mkdir()
    return plain_dmg(shared / "plain")


def _qemu_img_info(path: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads(images.run(["qemu-img", "info", "--output=json", str(path)]))
    return info


@pytest.mark.parametrize("which", ["mac", "plain"])
def test_the_writer_makes_a_udzo_dmg_that_qemu_reads_back_byte_for_byte(which: str, request: pytest.FixtureRequest,
                                                                        tmp_path: Path) -> None:
    disk: MacDisk = request.getfixturevalue(which)
    raw = disk.guest.raw
    info = _qemu_img_info(disk.dmg)
    assert (info["format"], info["virtual-size"]) == ("dmg", raw.stat().st_size)
    back = tmp_path / "back.raw"
    images.run(["qemu-img", "convert", "-f", "dmg", "-O", "raw", str(disk.dmg), str(back)])
    assert back.read_bytes() == raw.read_bytes()
    kinds = disk.written.chunk_types
    assert kinds[udif.UDZO] and kinds[udif.UDRW] and kinds[udif.UDZE]  # compressed, stored, and zero chunks
    assert disk.written.tables == (1 if which == "plain" else 7)  # MBR, GPT header and table, 2 partitions, ...
    assert disk.dmg.stat().st_size < raw.stat().st_size // 3


def test_qemu_nbd_fork_fails_on_the_warning_and_run_forked_does_not(mac: MacDisk, tmp_path: Path) -> None:
    pid_file, sock = tmp_path / "pid", tmp_path / "sock"
    argv = ["qemu-nbd", "--fork", "--read-only", "--socket", str(sock), "--pid-file", str(pid_file),
            "--image-opts", f"driver=dmg,file.driver=file,file.filename={mac.dmg}"]
    plain = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    _stop(pid_file)
    if MODULE_NOTE in plain.stderr:  # Debian 12: the bug this works around
        assert plain.returncode == 1
    result = run_forked(argv, pid_file, timeout=60)
    try:
        assert serving_pid(pid_file) is not None and sock.is_socket()
        assert MODULE_NOTE in result.stderr or MODULE_NOTE not in plain.stderr
    finally:
        _stop(pid_file)


def test_a_real_failure_is_still_one_clear_sentence(mac: MacDisk, tmp_path: Path) -> None:
    broken = _with_a_bad_trailer(mac.dmg, tmp_path / "broken.dmg")
    pid_file = tmp_path / "pid"
    argv = ["qemu-nbd", "--fork", "--read-only", "--socket", str(tmp_path / "sock"), "--pid-file",
            str(pid_file), "--image-opts", f"driver=dmg,file.driver=file,file.filename={broken}"]
    with pytest.raises(CommandError) as failed:
        run_forked(argv, pid_file, timeout=60)
    assert "module" not in failed.value.stderr and "Failed to blk_new_open" in failed.value.stderr
    assert serving_pid(pid_file) is None


def test_inspection_reads_a_dmg_through_its_private_qemu_nbd(mac: MacDisk) -> None:
    info = probe_image(str(mac.dmg))  # QEMU knows DMG by the name only: the probe finds the koly trailer
    assert info.format == "dmg"
    raw = mac.guest.raw.read_bytes()
    with open_image(info) as reader:
        assert reader.size == len(raw)
        assert reader.read(0, 4 << 20) == raw[: 4 << 20]
        assert reader.read(len(raw) - (1 << 20), 1 << 20) == raw[-(1 << 20):]


def test_a_dmg_with_corrupt_chunk_data_is_one_clear_error(mac: MacDisk, tmp_path: Path) -> None:
    data = bytearray(mac.dmg.read_bytes())
    data[:4096] = bytes(4096)  # the first chunks' zlib streams (the MBR and GPT): no longer inflatable
    bad = tmp_path / "bad.dmg"
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidImageError) as failed, open_image(probe_image(str(bad))) as reader:
        reader.read(0, 512)
    assert "corrupt" in str(failed.value) and "\n" not in str(failed.value)


def test_inspect_mount_and_unmount_through_the_daemon(c: Client, daemon: Daemon, mac: MacDisk) -> None:
    found = c.manager("Inspect", "sa{sv}", str(mac.dmg), {}).value()
    assert found["format"].value == "dmg"
    volumes = {x["name"].value: x["filesystem"].value["type"].value for x in found["volumes"].value}
    assert volumes == {"p1": "ext4", "p2": "xfs"}
    path = c.mount(mac.dmg, backend=v("s", "fuse")).value()
    mounted = {name: Path(where) for name, _dev, _fs, where in c.prop(path, MOUNT_IFACE, "Volumes")}
    assert c.prop(path, MOUNT_IFACE, "Format") == "dmg"
    for name, files in mac.guest.files.items():
        check_files(mounted[name], files)
    export = c.prop(path, MOUNT_IFACE, "Device")
    c.call(path, MOUNT_IFACE, "Unmount", "a{sv}", [{}]).value()
    assert not any(p.exists() for p in mounted.values()) and not os.path.exists(export)
    assert MODULE_NOTE in daemon.log() or MODULE_NOTE not in _qemu_img_stderr(mac.dmg)
    assert "Traceback" not in daemon.log()


def test_the_commands_mount_a_plain_dmg(bus: Bus, daemon: Daemon, plain: MacDisk, shared: Path) -> None:
    shown = _command(bus, "imgmount", "--info", str(plain.dmg))
    assert shown.returncode == 0 and f"{plain.dmg}: dmg, 24 MiB virtual" in shown.stdout, shown.stderr
    mounted = _command(bus, "imgmount", str(plain.dmg), "--mount-root", str(shared), "--json")
    assert mounted.returncode == 0, mounted.stderr
    volume = json.loads(mounted.stdout)["volumes"][0]
    check_files(Path(volume["mountpoint"]), plain.guest.files["disk"])
    assert _command(bus, "imgumount", str(plain.dmg)).returncode == 0
    assert not Path(volume["mountpoint"]).exists()


def test_a_callers_dmg_is_served_by_a_qemu_running_as_the_caller(
        c: Client, daemon: Daemon, other: Callable[..., OtherUser], users: dict[str, tuple[int, int]],
        group: int, mac: MacDisk) -> None:
    """Her QEMU (qemu-storage-daemon as her uid) prints the module notes too, to its log: it serves all the same."""
    uid = users["daemon"][0]
    member = other(*users["daemon"], groups=(group,))
    path = member.mount(mac.dmg).value()
    assert len(servers_of(uid)) == 1
    for name, _dev, _fs, where in c.prop(path, MOUNT_IFACE, "Volumes"):
        check_files(Path(where), mac.guest.files[name])
    assert member.unmount(path).value() is None
    assert servers_of(uid) == [] and "Traceback" not in daemon.log()
    said = f"as uid {uid}) started, and said: qemu: {MODULE_NOTE}"
    assert said in daemon.log() or MODULE_NOTE not in _qemu_img_stderr(mac.dmg)


def test_a_broken_dmg_is_refused_in_one_sentence(c: Client, mac: MacDisk, tmp_path: Path) -> None:
    broken = _with_a_bad_trailer(mac.dmg, tmp_path / "broken.dmg")
    text = error(c.mount(broken), "InvalidImage")
    assert text.startswith(f"QEMU cannot open {broken}") and "module" not in text and "\n" not in text


def _with_a_bad_trailer(dmg: Path, to: Path) -> Path:
    """The DMG with a trailer whose property list runs past the trailer itself (QEMU: "Invalid argument")."""
    data = bytearray(dmg.read_bytes())
    struct.pack_into(">Q", data, len(data) - 512 + 0xE0, len(data))  # koly XMLLength
    to.write_bytes(bytes(data))
    return to


def _qemu_img_stderr(path: Path) -> str:
    return subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True, check=False).stderr


def _command(bus: Bus, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: x for k, x in os.environ.items() if k != "IMGMOUNT_STATE_DIR"}
    env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env, check=False,
                          timeout=120)


def _stop(pid_file: Path) -> None:
    pid = serving_pid(pid_file)
    started = start_time(pid) if pid else None
    if pid and started is not None and is_alive(pid, started):
        stop_process(pid, started, "qemu-nbd", force=True)
    pid_file.unlink(missing_ok=True)


def _with_a_huge_chunk(dmg: Path, to: Path) -> Path:
    """The DMG with its first block table's first chunk claiming 2^40 sectors (8 TiB to inflate at once)."""
    data = bytearray(dmg.read_bytes())
    trailer = len(data) - 512
    xml_at, xml_len = struct.unpack_from(">QQ", data, trailer + 0xD8)
    tables = plistlib.loads(bytes(data[xml_at:xml_at + xml_len]))
    first = bytearray(tables["resource-fork"]["blkx"][0]["Data"])
    struct.pack_into(">I", first, udif.MISH.size, udif.UDZO)
    struct.pack_into(">Q", first, udif.MISH.size + 16, 1 << 40)
    tables["resource-fork"]["blkx"][0]["Data"] = bytes(first)
    xml = plistlib.dumps(tables)
    koly = bytearray(data[trailer:])
    struct.pack_into(">Q", koly, 0xE0, len(xml))
    to.write_bytes(bytes(data[:xml_at]) + xml + bytes(koly))
    return to


def test_a_crafted_chunk_size_is_refused_quickly(c: Client, mac: MacDisk, tmp_path: Path) -> None:
    crafted = _with_a_huge_chunk(mac.dmg, tmp_path / "crafted.dmg")
    started = time.monotonic()
    text = error(c.mount(crafted), "InvalidImage")
    assert time.monotonic() - started < 10
    assert text.startswith(f"QEMU cannot open {crafted}") and text.endswith("Invalid argument") and "\n" not in text
