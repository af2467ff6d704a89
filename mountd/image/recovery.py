"""Whether a filesystem holds writes that only a journal or log replay shows (design: "Filesystems").

A filesystem that was not unmounted cleanly (the VM crashed, or its QEMU was killed) keeps its last
acknowledged writes in its journal (ext3/ext4), log (xfs) or log tree (btrfs: fsynced files) until the next
mount replays them. A read-only mount that suppresses the replay shows the filesystem as it was before those
writes. This module says which filesystems are in that state, by pure parsing of their on-disk structures
through a :class:`~mountd.image.blockio.BlockReader` (bounded: a few reads, at most a few MiB, for any size):

- ext3/ext4: the superblock's ``needs_recovery`` (incompat RECOVER) flag; a journal on another device
  (``s_journal_inum`` 0) cannot be replayed here;
- btrfs: a log tree root in the superblock;
- xfs: the log's head found as the kernel finds it (``xlog_find_head``: the cycle number stamped on every
  512-byte block, binary search, then a scan for holes and for a torn last record), and whether the last
  record before it is an unmount record (``xlog_check_unmount_rec``); checked against ``xfs_logprint``
  in the tests, wrapped logs included. Anything unexpected reads as clean: the mount then goes without a
  replay, as every read-only mount did before this check.

NTFS keeps a dirty flag in ``$Volume``, which takes an MFT walk to reach; ntfs3 replays ``$LogFile`` only on a
read-write mount anyway.
"""

from __future__ import annotations

import struct

from mountd.image.blockio import BlockReader

#: What :func:`pending` answers.
CLEAN, PENDING, ELSEWHERE = "", "pending", "external"

EXT_SUPERBLOCK = 1024
EXT_MAGIC = 0xEF53
EXT_COMPAT_HAS_JOURNAL, EXT_INCOMPAT_RECOVER = 0x4, 0x4

BTRFS_SUPERBLOCK = 64 << 10
BTRFS_MAGIC = b"_BHRfS_M"

BB = 512  # the log's basic block
XFS_MAGIC = b"XFSB"
LOG_MAGIC = 0xFEEDBABE
LOG_UNMOUNT_TRANS = 0x20
LOG_VERSION_2 = 2
LOG_HEADER_CYCLE_SIZE = 32 << 10
#: Blocks the in-core log can have in flight (8 log buffers of 256 KiB): holes lie within this of the head.
LOG_SCAN = 8 * (256 << 10) // BB
#: One log record at most (256 KiB of data and its header blocks): its header lies within this of its end.
LOG_RECORD = (256 << 10) // BB + 8
#: A record header: magic, cycle, version, len, lsn, tail_lsn, crc, prev_block, num_logops.
LOG_HEADER = struct.Struct(">IIIIQQIII")
LOG_WORDS = struct.Struct(">II")
LOG_H_SIZE = 320  # offset of h_size, the log buffer size of a v2 log


def pending(fstype: str, reader: BlockReader) -> str:
    """:data:`PENDING` if the filesystem on ``reader`` holds writes its journal or log has yet to apply,
    :data:`ELSEWHERE` if they are in a journal on another device, :data:`CLEAN` otherwise (or unknown)."""
    if fstype in ("ext3", "ext4"):
        return _ext(reader)
    if fstype == "xfs":
        return PENDING if _xfs_dirty(reader) else CLEAN
    if fstype == "btrfs":
        return _btrfs(reader)
    return CLEAN


def log_name(fstype: str) -> str:
    """What ``fstype`` calls the place its pending writes wait in."""
    return {"xfs": "log", "btrfs": "log tree"}.get(fstype, "journal")


def describe(fstype: str, state: str) -> str:
    """A short note for ``--info``: what the filesystem needs."""
    if state == ELSEWHERE:
        return "needs journal recovery, from a journal on another device: not unmounted cleanly"
    return f"needs {log_name(fstype)} recovery: not unmounted cleanly" if state else ""


def _ext(reader: BlockReader) -> str:
    sb = reader.read(EXT_SUPERBLOCK, 1024)
    if len(sb) < 0xE8 or struct.unpack_from("<H", sb, 0x38)[0] != EXT_MAGIC:
        return CLEAN
    compat, incompat = struct.unpack_from("<II", sb, 0x5C)
    if not incompat & EXT_INCOMPAT_RECOVER or not compat & EXT_COMPAT_HAS_JOURNAL:
        return CLEAN
    return ELSEWHERE if struct.unpack_from("<I", sb, 0xE0)[0] == 0 else PENDING


def _btrfs(reader: BlockReader) -> str:
    sb = reader.read(BTRFS_SUPERBLOCK, 0x68)
    if len(sb) < 0x68 or sb[0x40:0x48] != BTRFS_MAGIC:
        return CLEAN
    return PENDING if struct.unpack_from("<Q", sb, 0x60)[0] else CLEAN


# ---- xfs --------------------------------------------------------------------------------------------------


class XfsLog:
    """The internal log of an xfs filesystem: ``blocks`` basic blocks from byte ``start`` of ``reader``."""

    def __init__(self, reader: BlockReader, start: int, blocks: int) -> None:
        self.reader = reader
        self.start = start
        self.blocks = blocks

    @classmethod
    def find(cls, reader: BlockReader) -> XfsLog | None:
        """The log the superblock names, if it is internal and inside ``reader``."""
        sb = reader.read(0, 128)
        if len(sb) < 128 or sb[:4] != XFS_MAGIC:
            return None
        blocksize, logstart = struct.unpack_from(">I", sb, 4)[0], struct.unpack_from(">Q", sb, 48)[0]
        agblocks, logblocks = struct.unpack_from(">I", sb, 84)[0], struct.unpack_from(">I", sb, 96)[0]
        agblklog = sb[124]
        if logstart == 0 or blocksize < BB or agblklog > 31:  # 0: an external log, which we cannot see
            return None
        ag, block = logstart >> agblklog, logstart & ((1 << agblklog) - 1)
        start, size = (ag * agblocks + block) * blocksize, logblocks * blocksize
        if size < 2 * BB or start + size > reader.size:
            return None
        return cls(reader, start, size // BB)

    def read(self, blk: int, count: int) -> bytes:
        """``count`` blocks from ``blk``, wrapping at the end of the log."""
        blk %= self.blocks
        first = min(count, self.blocks - blk)
        data = self.reader.read(self.start + blk * BB, first * BB)
        if first < count:
            data += self.reader.read(self.start, (count - first) * BB)
        return data

    def cycle(self, blk: int) -> int:
        return _cycle(self.read(blk, 1), 0)


def _cycle(data: bytes, offset: int) -> int:
    """The cycle number a log block is stamped with: its first word, or a record header's second."""
    if len(data) < offset + 8:
        return 0
    first, second = LOG_WORDS.unpack_from(data, offset)
    return int(second if first == LOG_MAGIC else first)


def _xfs_dirty(reader: BlockReader) -> bool:
    log = XfsLog.find(reader)
    if log is None or log.cycle(0) == 0:  # a log never written: nothing to replay
        return False
    head = _head(log)
    found = _last_record(log, head)
    if found is not None and _end(log, *found) != head:  # a torn last record: the head is where it starts
        head = found[0]
        found = _last_record(log, head)
    if found is None:
        return False
    rblk, header = found
    return not (header[8] == 1 and _end(log, rblk, header) == head and _unmount_op(log, rblk, header))


def _head(log: XfsLog) -> int:
    """The first block the last writer had not written (``xlog_find_head``, before the torn-record check)."""
    last = log.blocks - 1
    first_cycle, last_cycle = log.cycle(0), log.cycle(last)
    if last_cycle == 0:  # a log not yet written to its end: the head is the first block never written
        head, stop = _first_with_cycle(log, 0, last, 0), 0
    elif first_cycle == last_cycle:  # one cycle throughout: the head is at 0, or at a hole of the one before
        head, stop = log.blocks, last_cycle - 1
    else:
        head, stop = _first_with_cycle(log, 0, last, last_cycle), last_cycle
    scan = min(log.blocks, LOG_SCAN)
    if head >= scan:
        return _first_hole(log, head - scan, scan, stop, head) % log.blocks
    wrapped = _first_hole(log, log.blocks - (scan - head), scan - head, stop - 1, -1)
    if wrapped >= 0:
        return wrapped
    return _first_hole(log, 0, head, stop, head) % log.blocks


def _first_with_cycle(log: XfsLog, first: int, last: int, cycle: int) -> int:
    """Binary search for the first block stamped ``cycle`` in ``(first, last]`` (``last`` is one)."""
    while last - first > 1:
        mid = (first + last) // 2
        if log.cycle(mid) == cycle:
            last = mid
        else:
            first = mid
    return last


def _first_hole(log: XfsLog, start: int, count: int, cycle: int, default: int) -> int:
    """The first of ``count`` blocks from ``start`` stamped ``cycle``, else ``default``."""
    data = log.read(start, count)
    for i in range(len(data) // BB):
        if _cycle(data, i * BB) == cycle:
            return start + i
    return default


def _last_record(log: XfsLog, before: int) -> tuple[int, tuple[int, ...]] | None:
    """The block and header of the last log record header before block ``before`` (one record's length
    back at most: data blocks never start with the magic, their first word is the cycle number)."""
    span = min(LOG_RECORD, log.blocks)
    data = log.read(before - span, span)
    for i in range(len(data) // BB - 1, -1, -1):
        if struct.unpack_from(">I", data, i * BB)[0] == LOG_MAGIC:
            return (before - span + i) % log.blocks, LOG_HEADER.unpack_from(data, i * BB)
    return None


def _end(log: XfsLog, rblk: int, header: tuple[int, ...]) -> int:
    """The block after the record whose header is at ``rblk``."""
    return (rblk + _header_blocks(header, log.read(rblk, 1)) + -(-header[3] // BB)) % log.blocks


def _header_blocks(header: tuple[int, ...], block: bytes) -> int:
    """How many blocks the record header takes (v2 logs with log buffers over 32 KiB take more than one)."""
    size = struct.unpack_from(">I", block, LOG_H_SIZE)[0] if len(block) >= LOG_H_SIZE + 4 else 0
    if header[2] & LOG_VERSION_2 and size > LOG_HEADER_CYCLE_SIZE:
        return -(-size // LOG_HEADER_CYCLE_SIZE)
    return 1


def _unmount_op(log: XfsLog, rblk: int, header: tuple[int, ...]) -> bool:
    """The record's first operation is an unmount record."""
    data = log.read(rblk + _header_blocks(header, log.read(rblk, 1)), 1)
    return len(data) >= 10 and bool(data[9] & LOG_UNMOUNT_TRANS)  # xlog_op_header.oh_flags
