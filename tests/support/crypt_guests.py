"""Encrypted guest disks with known content (built as their tools build them: imgmount_testkit.crypt_images):
a GPT disk whose p2 is LUKS1 (cryptsetup's layout, filled through QEMU's luks driver), and qcow2 images
encrypted by QEMU (LUKS, legacy AES) holding a GPT disk."""

from __future__ import annotations

from pathlib import Path

from imgmount_testkit import crypt_images, images
from tests.support.guests import Guest, _content

MiB = images.MiB
PASSPHRASE = b"correct horse battery staple"
IMAGE_PASSPHRASE = b"qemu image secret"
PLAIN_SIZE, LUKS_SIZE = 16 * MiB, 40 * MiB


def _place(disk: Path, offset: int, piece: Path) -> None:
    with open(piece, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(offset)
        while chunk := src.read(MiB):
            dst.write(chunk)


def luks1_partition_guest(workdir: Path, passphrase: bytes = PASSPHRASE, formatter: str = "cryptsetup") -> Guest:
    """GPT: p1 plain ext4 (``/boot``), p2 LUKS1 holding ext4 (``root``), formatted by ``formatter``."""
    raw = images.blank(workdir / "luks1-disk.raw", 64 * MiB)
    images.partition(raw, f"label: gpt\nsize={PLAIN_SIZE // MiB}MiB\nsize={LUKS_SIZE // MiB}MiB\n")
    p1, p2 = images.sfdisk_json(raw)["partitions"]
    boot = crypt_images.ext4_with(workdir / "boot.ext4", PLAIN_SIZE, _content("p1"), label="boot")
    _place(raw, p1["start"] * 512, boot)
    root = crypt_images.ext4_with(workdir / "root.ext4", LUKS_SIZE - 4 * MiB, _content("p2"), label="root")
    volume = crypt_images.luks1_volume(workdir / "root.luks", passphrase, root, formatter=formatter)
    _place(raw, p2["start"] * 512, volume)
    return Guest(raw, {"p1": _content("p1"), "p2": _content("p2")}, {"p1": "ext4", "p2": "ext4"})


def luks1_lvm_guest(workdir: Path, passphrase: bytes = PASSPHRASE) -> Guest:
    """GPT: p1 LUKS1 holding an LVM physical volume of VG ``cryptvg`` with the ext4 LV ``root`` (the layout
    of older Debian and Ubuntu "encrypted LVM" installs, which wrote LUKS1)."""
    pv = images.blank(workdir / "pv.raw", LUKS_SIZE - 4 * MiB)
    images.make_lvm(pv, 0, LUKS_SIZE - 4 * MiB, "cryptvg",
                    [images.LvSpec("root", 24, "ext4", "root", _content("cryptvg/root"))])
    raw = images.blank(workdir / "luks1-lvm.raw", 48 * MiB)
    images.partition(raw, f"label: gpt\nsize={LUKS_SIZE // MiB}MiB\n")
    (p1,) = images.sfdisk_json(raw)["partitions"]
    _place(raw, p1["start"] * 512, crypt_images.luks1_volume(workdir / "pv.luks", passphrase, pv))
    return Guest(raw, {"cryptvg/root": _content("cryptvg/root")}, {"cryptvg/root": "ext4"})


def qemu_encrypted_guest(workdir: Path, encryption: str, passphrase: bytes = IMAGE_PASSPHRASE) -> Guest:
    """A qcow2 encrypted by QEMU (``luks`` or the legacy ``aes``) holding GPT: p1 ext4."""
    raw = images.blank(workdir / f"{encryption}-plain.raw", 32 * MiB)
    images.partition(raw, "label: gpt\nsize=24MiB\n")
    (p1,) = images.sfdisk_json(raw)["partitions"]
    _place(raw, p1["start"] * 512, crypt_images.ext4_with(workdir / "p1.ext4", 24 * MiB, _content("p1")))
    image = crypt_images.encrypted_qcow2(raw, workdir / f"{encryption}.qcow2", passphrase, encryption)
    raw.unlink()
    return Guest(image, {"p1": _content("p1")}, {"p1": "ext4"})
