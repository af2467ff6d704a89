"""A BitLocker writer for tests: encrypt a plain NTFS volume in place as Windows 10 does.

No Linux tool creates a BitLocker volume, so this one writes what Windows 10 (and 11) write when BitLocker is
turned on for a fixed data drive or for an NTFS removable drive (BitLocker To Go on NTFS has the same layout),
with "encrypt entire drive", the default XTS-AES-128 (method 0x8004), a password and the recovery password
every volume has. Every detail was taken from the two readers Debian packages, dislocker 0.7.3
(``src/metadata``, ``src/accesses``, ``src/encryption``, ``src/inouts``) and libbde 20190102
(``libbde_metadata.c``, ``libbde_sector_data.c``, its format document), and compared byte by byte with
volumes Windows 10 wrote (the test data of fox-it/dissect.fve, decrypted with their published passwords).

Faithful:

* the volume header: the FAT32-looking boot sector of BitLocker 7+ (``EB 58 90 -FVE-FS-``, the BPB fields
  Windows copies from the NTFS boot sector, 0x1FE0 sectors per FAT, "NO NAME", "FAT32"), the BitLocker GUID
  at 0xA0 and the three metadata offsets at 0xB0;
* three identical 64 KiB FVE metadata blocks: block header version 2 (size in 16-byte units, state
  ENCRYPTED/ENCRYPTED, encrypted volume size = the volume's size, 16 relocated header sectors, the three
  offsets, the relocated header's offset), metadata header (size, version 1, volume GUID, next nonce counter,
  method 0x8004 then 0 (Windows repeats the method there only on a password-only volume), FILETIME), then
  the datums in Windows' order: description "<COMPUTER> <label> <M/D/YYYY>", the recovery-password VMK
  (protection 0x0800: "DiskPassword", stretch key 0x1000 whose nested AES-CCM datums hold the 16-byte
  recovery key (role 0x12) and the stretched key (role 0x13) under the VMK, then the VMK under the stretched
  key), the password VMK (0x2000: stretch key 0x1001 holding the stretched key (0x2007) under the VMK, then
  the VMK), the FVEK under the VMK, the volume header block (offset, 8192 bytes, and Windows 8+'s extended
  information); the nonce counters Windows used for these protectors;
* after the metadata, the validation: ``0x10000 - size``, version 2, the CRC-32 of the metadata and an
  AES-CCM datum (nonce time with bit 63 set) holding the SHA-256 of the metadata (key type 0x2005) under the
  VMK; dislocker checks the CRC-32;
* keys: SHA-256(SHA-256(UTF-16LE password)) or SHA-256(recovery key), stretched by 0x100000 rounds of
  SHA-256 over {last hash, initial hash, salt, counter}; AES-CCM (standard: 12-byte nonce = FILETIME +
  counter, 16-byte tag; stored nonce, MAC, ciphertext) of key datums of version 0;
* sectors: XTS-AES-128 with the FVEK (data key, then tweak key), the tweak being the sector number (offset in
  the volume / 512), one XTS data unit per sector; the first 16 sectors of the plain volume are stored,
  encrypted with the tweaks of their new place, right after the first metadata block; every other sector
  (free space too) is encrypted in place;
* placement: the blocks go into free clusters of the NTFS (as Windows' FVE2 files do), spread over the
  volume as Windows 10 spread them (the first metadata block at about 54% of it, immediately followed by
  the relocated header, the others at about 65% and 77%).

Simplified:

* the free clusters stay free in the NTFS: Windows allocates them to files in System Volume Information
  (FVE2.{GUID} and FVE2.{GUID}.1-3); writing this NTFS, through a reader, could overwrite the metadata
  (dislocker refuses such writes; mount read-only);
* no boot code in the volume header (Windows puts a few bytes of "Remove disks or other media" code there),
  and random bytes in sectors 1-15 (Windows' look random too; what they are is unknown);
* the opaque tail of the extended information is copied from Windows 10's, with the one offset in it
  computed; its meaning is unknown to both readers;
* 512-byte sectors only; one timestamp for every FILETIME; no TPM, startup key or auto-unlock protector.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

SECTOR = 512
HEADER_SECTORS = 16  # the relocated first sectors of the plain volume
HEADER_SIZE = HEADER_SECTORS * SECTOR
METADATA_SIZE = 0x10000  # each FVE metadata block's region, read as zeros through the readers
BITLOCKER_GUID = uuid.UUID("4967d63b-2e29-4ad8-8399-f6a339e3d001").bytes_le
SIGNATURE = b"-FVE-FS-"
STRETCH_ROUNDS = 0x100000
CHUNK = 4 << 20
#: Where Windows 10 put the first, second and third metadata block, as fractions of the volume.
PLACES = (0.54, 0.65, 0.77)

# Datum roles ("entry types") and value types.
ROLE_PROPERTY, ROLE_VMK, ROLE_FVEK, ROLE_DESCRIPTION, ROLE_VOLUME_HEADER = 0x00, 0x02, 0x03, 0x07, 0x0F
ROLE_RECOVERY_KEY, ROLE_RECOVERY_STRETCHED = 0x12, 0x13
KEY, UNICODE, STRETCH_KEY, AES_CCM, VMK, OFFSET_AND_SIZE = 0x01, 0x02, 0x03, 0x05, 0x08, 0x0F
# Key types.
STRETCH_RECOVERY, STRETCH_PASSWORD = 0x1000, 0x1001
KEY_VMK, KEY_HASH, KEY_PASSWORD_STRETCHED, KEY_RECOVERY_STRETCHED = 0x2003, 0x2005, 0x2007, 0x2008
AES_XTS_128 = 0x8004
# VMK protections.
PROTECTED_BY_RECOVERY_PASSWORD, PROTECTED_BY_PASSWORD = 0x0800, 0x2000
# Nonce counters Windows 10 used on a volume with a recovery password then a password.
NONCE_RECOVERY = (2, 3, 4)
NONCE_PASSWORD = (6, 7)
NONCE_FVEK, NONCE_VALIDATION, NEXT_NONCE = 10, 11, 12
STATE_ENCRYPTED = 4
EXTENDED_INFO = struct.Struct("<HHIQQIIIQIIIIQII")


@dataclass(frozen=True)
class Ntfs:
    """What the writer needs from the plain NTFS: its boot sector, free clusters and label."""

    boot: bytes
    cluster: int
    clusters: int
    bitmap: bytes
    label: str

    def free(self, cluster: int) -> bool:
        return not self.bitmap[cluster >> 3] >> (cluster & 7) & 1


@dataclass(frozen=True)
class Layout:
    """Offsets in the volume of the three metadata blocks and of the relocated header sectors."""

    metadata: tuple[int, int, int]
    header: int


@dataclass(frozen=True)
class Keys:
    """The volume master key, the full volume encryption key (XTS: data key, tweak key) and the time."""

    vmk: bytes
    fvek: bytes
    filetime: int


def encrypt_volume(path: Path, offset: int, size: int, *, password: str, recovery_password: str) -> None:
    """Encrypt the plain volume at [offset, offset+size) of the file at ``path`` in place, as BitLocker."""
    recovery_key = _recovery_key(recovery_password)
    if offset % SECTOR or size % SECTOR:
        raise ValueError("the volume must start and end on 512-byte sectors")
    fd = os.open(path, os.O_RDWR)
    try:
        ntfs = read_ntfs(fd, offset, size)
        layout = place(ntfs, size)
        header = _pread(fd, offset, HEADER_SIZE)
        keys = Keys(os.urandom(32), _xts_key(), _filetime())
        protectors = _recovery_vmk(keys, recovery_key) + _password_vmk(keys, password)
        block = metadata_block(keys, layout, size, _description(ntfs.label), protectors)
        _encrypt_in_place(fd, offset, size, keys.fvek)
        os.pwrite(fd, encrypt_sectors(keys.fvek, header, layout.header // SECTOR), offset + layout.header)
        for at in layout.metadata:
            os.pwrite(fd, block.ljust(METADATA_SIZE, b"\0"), offset + at)
        vbr = volume_header(ntfs.boot, layout.metadata)
        os.pwrite(fd, vbr + os.urandom(HEADER_SIZE - SECTOR), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def new_recovery_password(seed: int) -> str:
    """A valid 48-digit recovery password, deterministic per seed: 8 blocks of 6 digits, each 11 times a
    16-bit number (which makes its last digit the check digit dislocker verifies)."""
    rng = random.Random(seed)
    return "-".join(f"{rng.randrange(1 << 16) * 11:06d}" for _ in range(8))


# ---- keys -------------------------------------------------------------------------------------------------

def _recovery_key(recovery_password: str) -> bytes:
    """The 16-byte key of a recovery password: each block divided by 11, as a little-endian u16."""
    digits = recovery_password.replace("-", "")
    blocks = [int(digits[i:i + 6]) for i in range(0, 48, 6)] if len(digits) == 48 and digits.isdigit() else []
    if not blocks or any(b % 11 or b >= 11 << 16 for b in blocks):
        raise ValueError("a recovery password is 8 blocks of 6 digits, each a multiple of 11 below 720896")
    return b"".join(struct.pack("<H", b // 11) for b in blocks)


def stretch(initial: bytes, salt: bytes) -> bytes:
    """BitLocker's key stretch: 0x100000 rounds of SHA-256 over {last hash, initial hash, salt, counter}."""
    last = bytes(32)
    tail = initial + salt
    for count in range(STRETCH_ROUNDS):
        last = hashlib.sha256(last + tail + count.to_bytes(8, "little")).digest()
    return last


def password_hash(password: str) -> bytes:
    return hashlib.sha256(hashlib.sha256(password.encode("utf-16-le")).digest()).digest()


def _xts_key() -> bytes:
    """An XTS-AES-128 FVEK: data key then tweak key (XTS wants them different)."""
    while True:
        key = os.urandom(32)
        if key[:16] != key[16:]:
            return key


def _filetime() -> int:
    return (int(time.time()) + 11_644_473_600) * 10_000_000


# ---- datums -----------------------------------------------------------------------------------------------

def datum(role: int, value_type: int, body: bytes, version: int = 1) -> bytes:
    return struct.pack("<4H", 8 + len(body), role, value_type, version) + body


def key_datum(key_type: int, key: bytes) -> bytes:
    """A KEY datum as Windows encrypts it (version 0)."""
    return datum(ROLE_PROPERTY, KEY, struct.pack("<HH", key_type, 0) + key, version=0)


def ccm_datum(role: int, key: bytes, plain: bytes, filetime: int, counter: int) -> bytes:
    """An AES-CCM datum: nonce (FILETIME, counter), MAC, then the ciphertext of ``plain``."""
    nonce = struct.pack("<QI", filetime, counter)
    sealed = AESCCM(key, tag_length=16).encrypt(nonce, plain, None)
    return datum(role, AES_CCM, nonce + sealed[-16:] + sealed[:-16])


def _unicode(role: int, text: str) -> bytes:
    return datum(role, UNICODE, (text + "\0").encode("utf-16-le"))


def _stretch_datum(key_type: int, salt: bytes, nested: bytes) -> bytes:
    return datum(ROLE_PROPERTY, STRETCH_KEY, struct.pack("<HH", key_type, 0) + salt + nested)


def _vmk_datum(keys: Keys, protection: int, properties: bytes) -> bytes:
    head = uuid.uuid4().bytes_le + struct.pack("<QHH", keys.filetime, 0, protection)
    return datum(ROLE_VMK, VMK, head + properties)


def _password_vmk(keys: Keys, password: str) -> bytes:
    salt = os.urandom(16)
    stretched = stretch(password_hash(password), salt)
    kept, sealed = NONCE_PASSWORD
    nested = ccm_datum(ROLE_PROPERTY, keys.vmk, key_datum(KEY_PASSWORD_STRETCHED, stretched), keys.filetime,
                       kept)
    return _vmk_datum(keys, PROTECTED_BY_PASSWORD, _stretch_datum(STRETCH_PASSWORD, salt, nested) + ccm_datum(
        ROLE_PROPERTY, stretched, key_datum(KEY_VMK, keys.vmk), keys.filetime, sealed))


def _recovery_vmk(keys: Keys, recovery_key: bytes) -> bytes:
    salt = os.urandom(16)
    stretched = stretch(hashlib.sha256(recovery_key).digest(), salt)
    raw, kept, sealed = NONCE_RECOVERY
    nested = (ccm_datum(ROLE_RECOVERY_KEY, keys.vmk, key_datum(STRETCH_RECOVERY, recovery_key), keys.filetime,
                        raw)
              + ccm_datum(ROLE_RECOVERY_STRETCHED, keys.vmk, key_datum(KEY_RECOVERY_STRETCHED, stretched),
                          keys.filetime, kept))
    properties = (_unicode(ROLE_PROPERTY, "DiskPassword") + _stretch_datum(STRETCH_RECOVERY, salt, nested)
                  + ccm_datum(ROLE_PROPERTY, stretched, key_datum(KEY_VMK, keys.vmk), keys.filetime, sealed))
    return _vmk_datum(keys, PROTECTED_BY_RECOVERY_PASSWORD, properties)


def _description(label: str) -> str:
    """Windows' "<computer name> <volume label> <M/D/YYYY>"."""
    now = time.localtime()
    computer = socket.gethostname().split(".")[0].upper()[:15]
    return " ".join(part for part in (computer, label, f"{now.tm_mon}/{now.tm_mday}/{now.tm_year}") if part)


def _volume_header_datum(layout: Layout) -> bytes:
    extended = EXTENDED_INFO.pack(5, EXTENDED_INFO.size, 0, 0x0A, 0, 0, SECTOR, SECTOR,
                                  0x0A, 0x47BB, 2, 0, 0x02010110, layout.header + HEADER_SIZE, 0x10000, 0)
    where = struct.pack("<QQ", layout.header, HEADER_SIZE)
    return datum(ROLE_VOLUME_HEADER, OFFSET_AND_SIZE, where + extended)


# ---- metadata ---------------------------------------------------------------------------------------------

def metadata_block(keys: Keys, layout: Layout, size: int, description: str, protectors: bytes) -> bytes:
    """One FVE metadata block: block header, metadata header and datums (the VMK datums ``protectors``),
    padding to 16 bytes, then the validation."""
    datums = (_unicode(ROLE_DESCRIPTION, description) + protectors
              + ccm_datum(ROLE_FVEK, keys.vmk, key_datum(AES_XTS_128, keys.fvek), keys.filetime, NONCE_FVEK)
              + _volume_header_datum(layout))
    dataset_size = 0x30 + len(datums)
    dataset = struct.pack("<4I16sIHHQ", dataset_size, 1, 0x30, dataset_size, uuid.uuid4().bytes_le,
                          NEXT_NONCE, AES_XTS_128, 0, keys.filetime) + datums
    units = math.ceil((0x40 + dataset_size) / 16)
    header = struct.pack("<8s4HQII4Q", SIGNATURE, units, 2, STATE_ENCRYPTED, STATE_ENCRYPTED, size, 0,
                         HEADER_SECTORS, *layout.metadata, layout.header)
    metadata = (header + dataset).ljust(units * 16, b"\0")
    return metadata + _validation(keys, metadata)


def _validation(keys: Keys, metadata: bytes) -> bytes:
    digest = key_datum(KEY_HASH, hashlib.sha256(metadata).digest())
    sealed = ccm_datum(ROLE_PROPERTY, keys.vmk, digest, keys.filetime | 1 << 63, NONCE_VALIDATION)
    return struct.pack("<HHI", METADATA_SIZE - len(metadata), 2, zlib.crc32(metadata)) + sealed


def volume_header(ntfs_boot: bytes, metadata: tuple[int, int, int]) -> bytes:
    """BitLocker 7+'s boot sector, its BPB fields copied from the NTFS boot sector as Windows does."""
    vbr = bytearray(SECTOR)
    vbr[0:11] = b"\xeb\x58\x90" + SIGNATURE
    vbr[0x0B:0x0E] = ntfs_boot[0x0B:0x0E]  # bytes per sector, sectors per cluster
    vbr[0x15] = ntfs_boot[0x15]  # media descriptor
    vbr[0x18:0x20] = ntfs_boot[0x18:0x20]  # sectors per track, heads, hidden sectors
    struct.pack_into("<IHHIHH", vbr, 0x24, 0x1FE0, 0, 0, 0, 1, 6)
    struct.pack_into("<BBBI11s8s", vbr, 0x40, 0x80, 0, 0x29, 0, b"NO NAME    ", b"FAT32   ")
    vbr[0xA0:0xB0] = BITLOCKER_GUID
    struct.pack_into("<3Q", vbr, 0xB0, *metadata)
    vbr[0x1FE:0x200] = b"\x55\xaa"
    return bytes(vbr)


# ---- the plain NTFS ---------------------------------------------------------------------------------------

def read_ntfs(fd: int, offset: int, size: int) -> Ntfs:
    boot = _pread(fd, offset, SECTOR)
    if boot[3:11] != b"NTFS    " or boot[0x1FE:0x200] != b"\x55\xaa":
        raise ValueError("not an NTFS volume: BitLocker (for fixed and NTFS removable drives) converts NTFS")
    sector, per_cluster = struct.unpack_from("<HB", boot, 0x0B)
    if sector != SECTOR:
        raise ValueError(f"{sector}-byte sectors: only 512 is written here")
    cluster = sector * (per_cluster if per_cluster <= 0x80 else 1 << (256 - per_cluster))
    sectors, mft = struct.unpack_from("<QQ", boot, 0x28)
    if (sectors + 1) * SECTOR > size:
        raise ValueError(f"the NTFS ({sectors} sectors) does not fit in {size} bytes")
    record = struct.unpack_from("<b", boot, 0x40)[0]
    record_size = 1 << -record if record < 0 else record * cluster
    records = offset + mft * cluster
    bitmap_record = _mft_record(fd, records + 6 * record_size, record_size)
    volume_record = _mft_record(fd, records + 3 * record_size, record_size)
    clusters = sectors * SECTOR // cluster
    return Ntfs(boot, cluster, clusters, _bitmap(fd, offset, cluster, bitmap_record), _label(volume_record))


def _mft_record(fd: int, at: int, size: int) -> bytes:
    """An MFT record with its update sequence (fixups) applied."""
    record = bytearray(_pread(fd, at, size))
    if record[0:4] != b"FILE":
        raise ValueError(f"no MFT record at {at}")
    usa, count = struct.unpack_from("<HH", record, 4)
    for i in range(1, count):
        record[i * SECTOR - 2:i * SECTOR] = record[usa + 2 * i:usa + 2 * i + 2]
    return bytes(record)


def _attributes(record: bytes, kind: int) -> Iterator[bytes]:
    at = struct.unpack_from("<H", record, 0x14)[0]
    while at + 8 <= len(record):
        found, length = struct.unpack_from("<II", record, at)
        if found == 0xFFFFFFFF or length == 0:
            return
        if found == kind:
            yield record[at:at + length]
        at += length


def _runs(attribute: bytes) -> Iterator[tuple[int, int]]:
    """(first cluster, clusters) of a non-resident attribute, from its mapping pairs."""
    at, lcn = struct.unpack_from("<H", attribute, 0x20)[0], 0
    while attribute[at]:
        length_size, offset_size = attribute[at] & 0x0F, attribute[at] >> 4
        length = int.from_bytes(attribute[at + 1:at + 1 + length_size], "little")
        start = at + 1 + length_size
        lcn += int.from_bytes(attribute[start:start + offset_size], "little", signed=True)
        yield lcn, length
        at = start + offset_size


def _bitmap(fd: int, offset: int, cluster: int, record: bytes) -> bytes:
    data = next(a for a in _attributes(record, 0x80) if a[9] == 0)  # $Bitmap's unnamed $DATA
    if not data[8]:
        raise ValueError("a resident $Bitmap")
    real = struct.unpack_from("<Q", data, 0x30)[0]
    return b"".join(_pread(fd, offset + lcn * cluster, n * cluster) for lcn, n in _runs(data))[:real]


def _label(record: bytes) -> str:
    for attribute in _attributes(record, 0x60):  # $VOLUME_NAME, resident
        length, at = struct.unpack_from("<IH", attribute, 0x10)
        return attribute[at:at + length].decode("utf-16-le")
    return ""


def place(ntfs: Ntfs, size: int) -> Layout:
    """Free clusters for the metadata blocks (the first followed by the relocated header), where Windows
    puts them."""
    taken: set[int] = set()
    starts = []
    needs = (METADATA_SIZE + HEADER_SIZE, METADATA_SIZE, METADATA_SIZE)
    for need, fraction in zip(needs, PLACES, strict=True):
        count = math.ceil(need / ntfs.cluster)
        first = _free_run(ntfs, taken, int(ntfs.clusters * fraction), count)
        taken.update(range(first, first + count))
        starts.append(first * ntfs.cluster)
    if max(starts) + METADATA_SIZE > size:
        raise ValueError("no room for the BitLocker metadata")
    return Layout((starts[0], starts[1], starts[2]), starts[0] + METADATA_SIZE)


def _free_run(ntfs: Ntfs, taken: set[int], target: int, count: int) -> int:
    for start in (target, 0):
        run = 0
        for c in range(start, ntfs.clusters):
            run = run + 1 if ntfs.free(c) and c not in taken else 0
            if run == count:
                return c - count + 1
    raise ValueError(f"no {count} free clusters in a row for the BitLocker metadata")


# ---- sectors ----------------------------------------------------------------------------------------------

def encrypt_sectors(fvek: bytes, data: bytes, first: int) -> bytes:
    """XTS-AES with one data unit per sector, the tweak being the sector's number in the volume (a new
    tweak each sector: one XTS context cannot span sectors)."""
    key = algorithms.AES(fvek)
    out = bytearray(len(data))
    view = memoryview(data)
    for at in range(0, len(data), SECTOR):
        tweak = (first + at // SECTOR).to_bytes(16, "little")
        out[at:at + SECTOR] = Cipher(key, modes.XTS(tweak)).encryptor().update(view[at:at + SECTOR])
    return bytes(out)


def _encrypt_in_place(fd: int, offset: int, size: int, fvek: bytes) -> None:
    for at in range(0, size, CHUNK):
        plain = _pread(fd, offset + at, min(CHUNK, size - at))
        os.pwrite(fd, encrypt_sectors(fvek, plain, at // SECTOR), offset + at)


def _pread(fd: int, at: int, size: int) -> bytes:
    data = os.pread(fd, size, at)
    if len(data) != size:
        raise ValueError(f"short read: {len(data)} of {size} bytes at {at}")
    return data
