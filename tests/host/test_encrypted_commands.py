"""``imgmount`` with encrypted images, through imgmountd and in-process: ``--passphrase-stdin``,
``--key-file`` (opened by the command as the user who runs it), the question on a terminal (no echo) for
each locked volume, and ``--info`` saying what is locked and with what."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from imgmount_testkit.bus import Bus
from imgmount_testkit.client import Client
from imgmount_testkit.daemon import Daemon
from imgmount_testkit.users import as_user
from tests.support import guests
from tests.support.crypt_guests import IMAGE_PASSPHRASE, PASSPHRASE
from tests.support.daemon_calls import BIN, command, copy
from tests.support.guests import Guest
from tests.support.secret_scan import scanning_processes
from tests.support.terminal import at_terminal


def check_mounted(result: subprocess.CompletedProcess[str], guest: Guest) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    found = {v["name"]: v["mountpoint"] for v in json.loads(result.stdout)["volumes"]}
    assert set(found) == set(guest.files)
    for name, mnt in found.items():
        guests.check_files(Path(mnt), guest.files[name])
    return found


def unmount(bus: Bus, image: Path, **kw: object) -> None:
    done = command(bus.address, "imgumount", str(image), **kw)  # type: ignore[arg-type]
    assert done.returncode == 0, done.stderr


def test_passphrase_stdin_through_the_daemon(bus: Bus, c: Client, daemon: Daemon, luks_qcow2: Guest) -> None:
    with scanning_processes([IMAGE_PASSPHRASE]) as seen:
        result = command(bus.address, "imgmount", str(luks_qcow2.raw), "--passphrase-stdin", "--json",
                         stdin=IMAGE_PASSPHRASE.decode() + "\n")
    assert seen == set()
    check_mounted(result, luks_qcow2)
    unmount(bus, luks_qcow2.raw)


def test_a_users_key_file_through_the_daemon(bus: Bus, c: Client, daemon: Daemon, shared: Path,
                                             users: dict[str, tuple[int, int]], group: int,
                                             luks1_disk: Guest) -> None:
    uid, gid = users["daemon"]
    image, key = copy(luks1_disk.raw, shared / "hers-luks1.raw"), shared / "hers.key"
    key.write_bytes(PASSPHRASE)
    for path in (image, key):
        os.chown(path, uid, gid)
        path.chmod(0o600)
    her = as_user(uid, gid, (group,))
    with scanning_processes([PASSPHRASE]) as seen:
        result = command(bus.address, "imgmount", str(image), "--key-file", str(key), "--json", user=her)
    assert seen == set()
    check_mounted(result, luks1_disk)
    unmount(bus, image, user=her)
    key.chmod(0o000)  # a key file she cannot read is refused by her own open, before any call
    refused = command(bus.address, "imgmount", str(image), "--key-file", str(key), user=her)
    assert refused.returncode == 2 and "cannot read the key file" in refused.stderr
    assert c.manager("ListMounts").value() == []


def test_in_process_with_the_legacy_aes(bus: Bus, tmp_path: Path, aes_qcow2: Guest) -> None:
    state = tmp_path / "state"
    wrong = command(bus.address, "imgmount", str(aes_qcow2.raw), "--passphrase-stdin", stdin="wrong\n",
                    state_dir=state)
    assert wrong.returncode == 2 and "wrong passphrase for the image" in wrong.stderr
    result = command(bus.address, "imgmount", str(aes_qcow2.raw), "--passphrase-stdin", "--json",
                     stdin=IMAGE_PASSPHRASE.decode(), state_dir=state)
    check_mounted(result, aes_qcow2)
    unmount(bus, aes_qcow2.raw, state_dir=state)


def test_info_shows_what_is_locked(bus: Bus, luks1_disk: Guest, luks_qcow2: Guest) -> None:
    tree = command(bus.address, "imgmount", "--info", str(luks1_disk.raw))
    assert tree.returncode == 0, tree.stderr
    assert "(locked: LUKS1)" in next(line for line in tree.stdout.splitlines() if "p2" in line)
    found = json.loads(command(bus.address, "imgmount", "--info", "--json", str(luks1_disk.raw)).stdout)
    assert {v["name"]: v["locked"] for v in found["volumes"]} == {"p1": None, "p2": "LUKS1"}
    locked = json.loads(command(bus.address, "imgmount", "--info", "--json", str(luks_qcow2.raw)).stdout)
    assert (locked["locked"], locked["volumes"]) == ("QEMU luks", [])
    opened = json.loads(command(bus.address, "imgmount", "--info", "--json", "--passphrase-stdin",
                                str(luks_qcow2.raw), stdin=IMAGE_PASSPHRASE.decode()).stdout)
    assert [v["name"] for v in opened["volumes"]] == ["p1"]


def test_asks_on_the_terminal_for_each_locked_volume(tmp_path: Path, luks1_disk: Guest) -> None:
    """With a terminal on stdin and no key given, the command asks (no echo) for p2 only."""
    env = {**os.environ, "IMGMOUNT_STATE_DIR": str(tmp_path / "state")}
    with at_terminal([str(BIN / "imgmount"), str(luks1_disk.raw), "--json"], env) as term:
        prompt = term.read_until(b": ")
        assert prompt.strip().endswith(b"Passphrase for volume p2 (LUKS1):")
        term.type(PASSPHRASE)
        out, _ = term.proc.communicate(timeout=120)
        echoed = term.read_until(b"", timeout=0.5)
    assert PASSPHRASE not in echoed  # no echo
    check_mounted(subprocess.CompletedProcess([], term.proc.returncode, out.decode(), ""), luks1_disk)
    done = subprocess.run([str(BIN / "imgumount"), str(luks1_disk.raw)], env=env, check=False)
    assert done.returncode == 0
