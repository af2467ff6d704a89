"""Pure parts of mountd.host.holders: struct flock packing, fdinfo parsing, the state decision, the wording."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest

from mountd.host.holders import (
    FREE,
    LOCK_BYTES,
    READ_ONLY,
    READ_WRITE,
    FileUsage,
    Flock,
    Holder,
    decide_state,
    effective_lock_bytes,
    pack_flock,
    parse_fdinfo,
    unpack_flock,
)

QEMU = "qemu-system-x86_64"
RW_VM_LOCKS = frozenset({100, 101, 103, 201, 203})
RO_VM_LOCKS = frozenset({100, 201, 203})


def test_flock_has_the_kernel_layout() -> None:
    # x86_64: l_type@0 (short), l_whence@2 (short), pad, l_start@8, l_len@16 (off_t), l_pid@24 (pid_t), pad.
    data = pack_flock(Flock(fcntl.F_WRLCK, os.SEEK_SET, 101, 1, 0))
    assert len(data) == 32
    assert struct.unpack_from("<hh", data, 0) == (fcntl.F_WRLCK, os.SEEK_SET)
    assert struct.unpack_from("<qqi", data, 8) == (101, 1, 0)


def test_flock_round_trips_a_kernel_answer() -> None:
    # What F_OFD_GETLK answers when a read lock on bytes 100-101 conflicts: l_pid is -1 for OFD locks.
    answer = struct.pack("<hh4xqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 100, 2, -1)
    assert unpack_flock(answer) == Flock(fcntl.F_RDLCK, os.SEEK_SET, 100, 2, -1)
    assert pack_flock(unpack_flock(answer)) == answer


def test_fdinfo_of_a_read_write_qemu_fd() -> None:
    text = ("pos:\t0\nflags:\t02100002\nmnt_id:\t27\nino:\t2146355\n"
            "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2146355 203 203\n"
            "lock:\t2: OFDLCK ADVISORY  READ -1 fe:00:2146355 201 201\n"
            "lock:\t3: OFDLCK ADVISORY  READ -1 fe:00:2146355 103 103\n"
            "lock:\t4: OFDLCK ADVISORY  READ -1 fe:00:2146355 100 101\n")
    info = parse_fdinfo(text)
    assert info.writable
    assert info.lock_bytes == RW_VM_LOCKS


@pytest.mark.parametrize(("flags", "writable"), [
    ("02100000", False),  # O_RDONLY|O_LARGEFILE|O_CLOEXEC
    ("0100001", True),  # O_WRONLY
    ("0100002", True),  # O_RDWR
    ("04000", False),  # O_RDONLY|O_NONBLOCK
])
def test_fdinfo_open_mode(flags: str, writable: bool) -> None:
    assert parse_fdinfo(f"pos:\t0\nflags:\t{flags}\n").writable is writable


def test_fdinfo_lock_ranges_posix_and_eof() -> None:
    text = ("flags:\t0\n"
            "lock:\t1: POSIX  ADVISORY  WRITE 4242 08:01:77 0 EOF\n")
    assert parse_fdinfo(text).lock_bytes == frozenset(LOCK_BYTES)


def test_fdinfo_ignores_waiters_flock_leases_and_garbage() -> None:
    text = ("flags:\t0\n"
            "lock:\t1: -> OFDLCK ADVISORY  WRITE -1 08:01:77 101 101\n"
            "lock:\t2: FLOCK  ADVISORY  WRITE 99 08:01:77 0 EOF\n"
            "lock:\t3: LEASE  ACTIVE    READ 99 08:01:77 0 EOF\n"
            "lock:\t4: OFDLCK ADVISORY  READ -1 08:01:77 one two\n"
            "lock:\tshort\n"
            "lock:\t5: OFDLCK ADVISORY  READ -1 08:01:77 300 400\n")
    assert parse_fdinfo(text).lock_bytes == frozenset()


def _holder(pid: int = 1234, *, writable: bool = False, locks: frozenset[int] = frozenset()) -> Holder:
    return Holder(pid, QEMU, writable, locks)


@pytest.mark.parametrize(("lock_bytes", "holders", "state"), [
    (frozenset(), (), FREE),
    (RO_VM_LOCKS, (), READ_ONLY),  # a reader we cannot see
    (RW_VM_LOCKS, (), READ_WRITE),  # a writer we cannot see
    (frozenset({101}), (), READ_WRITE),
    (frozenset(), (_holder(),), READ_ONLY),  # open read-only, no locks
    (frozenset(), (_holder(writable=True),), READ_WRITE),  # locking=off VM: only /proc sees it
    (RO_VM_LOCKS, (_holder(writable=True),), READ_WRITE),
    (frozenset({203}), (), READ_ONLY),  # "does not share resize" alone is no write
])
def test_state_decision(lock_bytes: frozenset[int], holders: tuple[Holder, ...], state: str) -> None:
    assert decide_state(lock_bytes, holders) == state


def test_locks_of_ignored_processes_do_not_count() -> None:
    assert effective_lock_bytes(RW_VM_LOCKS, frozenset(), RW_VM_LOCKS) == frozenset()


def test_locks_nobody_visible_explains_still_count() -> None:
    assert effective_lock_bytes(RW_VM_LOCKS, frozenset(), RO_VM_LOCKS) == frozenset({101, 103})
    assert effective_lock_bytes(RO_VM_LOCKS, frozenset(), frozenset()) == RO_VM_LOCKS


def test_locks_of_visible_others_count_even_when_an_ignored_process_shares_them() -> None:
    # Two read-only users hold the same bytes: F_OFD_GETLK cannot tell them apart, fdinfo can.
    assert effective_lock_bytes(RO_VM_LOCKS, RO_VM_LOCKS, RO_VM_LOCKS) == RO_VM_LOCKS


def test_describe_free() -> None:
    assert FileUsage("/x/a.img", FREE, False, ()).describe() == "free"


def test_describe_names_the_writer_first() -> None:
    reader, writer = _holder(10, locks=RO_VM_LOCKS), _holder(20, writable=True, locks=RW_VM_LOCKS)
    usage = FileUsage("/x/a.img", READ_WRITE, True, (writer, reader))
    assert usage.describe() == f"in use read-write by {QEMU}, pid 20"


def test_describe_lists_readers() -> None:
    holders = tuple(_holder(pid) for pid in (1, 2, 3, 4, 5))
    assert FileUsage("/x/a.img", READ_ONLY, False, holders[:2]).describe() == (
        f"in use read-only by {QEMU}, pid 1 and {QEMU}, pid 2")
    assert FileUsage("/x/a.img", READ_ONLY, False, holders).describe() == (
        f"in use read-only by {QEMU}, pid 1, {QEMU}, pid 2, {QEMU}, pid 3 and 2 more")


def test_describe_a_lock_without_a_visible_holder() -> None:
    usage = FileUsage("/x/a.img", READ_WRITE, True, (), RW_VM_LOCKS)
    assert usage.describe() == "in use read-write by a process not visible here (it holds QEMU's write lock)"
