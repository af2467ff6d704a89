"""Encrypted test images, made the way their own tools make them: ``cryptsetup luksFormat`` on a plain file
(no device-mapper needed), QEMU's ``luks`` driver to fill a LUKS1 volume, and ``qemu-img convert`` with
``encrypt.format=luks|aes`` for QEMU-encrypted qcow2. Passphrases reach the tools by stdin or a 0600 file,
never in an argument. Key derivation is made cheap (PBKDF2, 1000 iterations) so tests stay fast.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from imgmount_testkit.images import MiB, blank, loop, run

FAST_KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256"]
LUKS1_ROOM = 4 * MiB  # what cryptsetup's LUKS1 header and key slots take before the data (2 MiB), and more


def luks_format(path: Path, passphrase: bytes, *, version: int = 1, label: str = "",
                offset: int = 0, size: int | None = None) -> None:
    """``cryptsetup luksFormat`` the region ``[offset, offset+size)`` of a file (default: all of it)."""
    argv = ["cryptsetup", "luksFormat", "--batch-mode", f"--type=luks{version}", *FAST_KDF,
            "--key-file=-"]
    if version == 2:
        argv += ["--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m"]
    if label:
        argv += ["--label", label]
    if offset == 0 and size is None:
        run_with_stdin([*argv, str(path)], passphrase)
        return
    with loop(path, offset, size) as dev:
        run_with_stdin([*argv, dev], passphrase)


def run_with_stdin(argv: list[str], data: bytes) -> None:
    """Run a tool with ``data`` on its stdin (a passphrase never goes into an argument)."""
    proc = subprocess.run(argv, input=data, capture_output=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode().strip()}")


@contextlib.contextmanager
def secret_file(passphrase: bytes) -> Iterator[Path]:
    """A 0600 file holding the passphrase, for QEMU's ``--object secret,file=``; removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="imgmount-test-secret-")
    try:
        os.write(fd, passphrase)
        os.close(fd)
        yield Path(name)
    finally:
        os.unlink(name)


def qemu_secret(secret: Path) -> list[str]:
    return ["--object", f"secret,id=sec0,file={secret}"]


def luks1_volume(path: Path, passphrase: bytes, filesystem: Path, *, formatter: str = "cryptsetup") -> Path:
    """A LUKS1 volume holding the raw filesystem image ``filesystem``, formatted by ``formatter``
    (``cryptsetup``, or ``qemu-img create -f luks`` where cryptsetup cannot work on the file: in the VM lane
    its key slots go through dm-crypt on a loop device, which the lane's 9p directory cannot serve) and
    filled through QEMU's luks driver (``qemu-img convert -n`` into the existing volume)."""
    with secret_file(passphrase) as secret:
        if formatter == "cryptsetup":
            blank(path, filesystem.stat().st_size + LUKS1_ROOM)
            luks_format(path, passphrase, version=1)
        else:
            qemu_keyed(["qemu-img", "create", "-q", "-f", "luks", *qemu_secret(secret),
                         "-o", "key-secret=sec0,iter-time=100", str(path), str(filesystem.stat().st_size)])
        target = f"driver=luks,key-secret=sec0,file.driver=file,file.filename={path}"
        run(["qemu-img", "convert", *qemu_secret(secret), "-n", "-f", "raw", str(filesystem),
             "--target-image-opts", target])
    return path


def encrypted_qcow2(src: Path, dst: Path, passphrase: bytes, encryption: str = "luks") -> Path:
    """``qemu-img convert`` a raw image to a qcow2 encrypted by QEMU (``luks``, or the legacy ``aes``)."""
    options = f"encrypt.format={encryption},encrypt.key-secret=sec0"
    if encryption == "luks":
        options += ",encrypt.iter-time=100"
    with secret_file(passphrase) as secret:
        qemu_keyed(["qemu-img", "convert", *qemu_secret(secret), "-f", "raw", "-O", "qcow2", "-o", options,
                     str(src), str(dst)])
    return dst


def qemu_keyed(argv: list[str]) -> None:
    """A qemu-img that makes a LUKS header: QEMU times its key derivation, and gives up on a loaded host."""
    for attempt in range(3):
        try:
            run(argv)
            return
        except RuntimeError as exc:
            if "accurate CPU usage" not in str(exc) or attempt == 2:
                raise


def ext4_with(path: Path, size: int, files: Mapping[str, bytes], label: str = "") -> Path:
    """A raw ext4 image holding ``files``, made by ``mkfs.ext4 -d`` as installers' image builders do."""
    tree = Path(tempfile.mkdtemp(prefix="imgmount-test-tree-"))
    try:
        for name, data in files.items():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(data)
        blank(path, size)
        run(["mkfs.ext4", "-q", "-F", *(["-L", label] if label else []), "-d", str(tree), str(path)])
    finally:
        run(["rm", "-rf", "--one-file-system", str(tree)])
    return path


__all__ = ["MiB", "encrypted_qcow2", "ext4_with", "luks1_volume", "luks_format", "secret_file"]
