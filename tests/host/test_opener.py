"""The opener: a caller's files opened as the caller, handed back as descriptors (real uids via setpriv)."""

from __future__ import annotations

import fcntl
import os
import pwd
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit.bus import world_dir
from mountd.errors import (
    InUseError,
    InvalidArgumentError,
    NotAuthorizedError,
    NotFoundError,
    OperationTimeoutError,
)
from mountd.host import opener as opener_module
from mountd.host.opener import PATH_MAX, Credentials, Opener

F_SETLEASE = 1024


@pytest.fixture
def where() -> Iterator[Path]:
    path = world_dir("imgmount-opener-")
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture(params=["root", "caller"])
def opener(request: pytest.FixtureRequest) -> Iterator[Opener]:
    account = pwd.getpwnam("daemon")
    with Opener(None if request.param == "root" else Credentials(account.pw_uid, (account.pw_gid,))) as o:
        yield o


def test_the_descriptor_is_the_file_the_caller_opened(where: Path) -> None:
    account = pwd.getpwnam("daemon")
    mine = where / "mine.img"
    mine.write_bytes(b"hers")
    os.chown(mine, account.pw_uid, account.pw_gid)
    mine.chmod(0o600)
    link = where / "link.img"
    link.symlink_to(mine)
    with Opener(Credentials(account.pw_uid, (account.pw_gid,))) as o:
        opened = o.open(str(link), write=True)
        assert opened.name == str(mine)
        assert (opened.dev, opened.ino) == (mine.stat().st_dev, mine.stat().st_ino)
        assert os.pread(opened.fd, 4, 0) == b"hers"
        assert fcntl.fcntl(opened.fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK) == os.O_RDWR
        assert o.by_name() == {str(mine): opened.fd}
    with pytest.raises(OSError):
        os.fstat(opened.fd)  # closed with the opener


def test_what_only_root_may_read_is_refused_to_the_caller(where: Path) -> None:
    secret = where / "secret.img"
    secret.write_bytes(b"SECRET")
    secret.chmod(0o600)
    public = where / "public.img"
    public.write_bytes(b"x")
    public.chmod(0o644)
    account = pwd.getpwnam("daemon")
    with Opener(Credentials(account.pw_uid, (account.pw_gid,))) as o:
        with pytest.raises(NotAuthorizedError, match=f"cannot open {secret} for reading"):
            o.open(str(secret), write=False)
        with pytest.raises(NotAuthorizedError, match=f"cannot open {public} for writing"):
            o.open(str(public), write=True)
        assert o.open(str(public), write=False).name == str(public)


def test_fifos_devices_directories_and_bad_paths_are_clear_errors(where: Path, opener: Opener) -> None:
    fifo = where / "fifo"
    os.mkfifo(fifo, 0o666)
    start = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        opener.open(str(fifo), write=False)  # O_PATH first: a FIFO with no writer never blocks us
    assert time.monotonic() - start < 5
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        opener.open("/dev/null", write=False)
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        opener.open(str(where), write=False)
    with pytest.raises(NotFoundError, match="no such image"):
        opener.open(str(where / "nothing"), write=False)
    with pytest.raises(InvalidArgumentError, match="absolute"):
        opener.open("relative.img", write=False)
    with pytest.raises(InvalidArgumentError, match="PATH_MAX"):
        opener.open("/" + "x" * PATH_MAX, write=False)
    with pytest.raises(InvalidArgumentError, match="newline or NUL"):
        opener.open("/x\0y", write=False)


def test_a_lease_on_the_file_answers_at_once_instead_of_stalling(where: Path, opener: Opener) -> None:
    """A write lease makes a plain open wait lease-break-time (45 s): ours gives up at once."""
    leased = where / "leased.img"
    leased.write_bytes(b"x")
    leased.chmod(0o666)  # she may write it: only the lease stands in the way
    fd = os.open(leased, os.O_RDONLY)
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease holder (us) is told of the break
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)  # a read lease: any open for writing must wait
        start = time.monotonic()
        with pytest.raises(InUseError, match="a program holds a lease on it"):
            opener.open(str(leased), write=True)
        assert time.monotonic() - start < 5
    finally:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        signal.signal(signal.SIGIO, previous)


def _child_of(opener: Opener) -> int:
    assert opener._child is not None
    return opener._child.proc.pid


def test_a_callers_opener_is_kept_for_her_next_call_and_replaced_if_she_kills_it(where: Path) -> None:
    """Her opener child serves her next call too (no ~12 ms start), never another uid's; one she killed
    in between is replaced without the call failing."""
    mine = where / "mine.img"
    mine.write_bytes(b"x")
    mine.chmod(0o644)
    daemon, bin_ = pwd.getpwnam("daemon"), pwd.getpwnam("bin")
    hers, his = Credentials(daemon.pw_uid, (daemon.pw_gid,)), Credentials(bin_.pw_uid, (bin_.pw_gid,))
    with Opener(hers) as o:
        o.open(str(mine), write=False)
        first = _child_of(o)
    with Opener(hers) as o:
        o.open(str(mine), write=False)
        assert _child_of(o) == first
    with Opener(his) as o:
        o.open(str(mine), write=False)
        assert _child_of(o) != first
        uid_line = Path(f"/proc/{_child_of(o)}/status").read_text().split("Uid:")[1].split()
        assert uid_line[:2] == [str(bin_.pw_uid)] * 2
    os.kill(first, signal.SIGKILL)
    with Opener(hers) as o:
        assert o.open(str(mine), write=False).name == str(mine)
        assert _child_of(o) != first


def test_a_stopped_opener_times_out_and_is_not_kept(where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """She stops her opener child (SIGSTOP): the call ends after the timeout (shortened here) with Timeout,
    and the next call gets a new child."""
    mine = where / "mine.img"
    mine.write_bytes(b"x")
    mine.chmod(0o644)
    daemon = pwd.getpwnam("daemon")
    hers = Credentials(daemon.pw_uid, (daemon.pw_gid,))
    with Opener(hers) as o:
        o.open(str(mine), write=False)
        stuck = _child_of(o)
    os.kill(stuck, signal.SIGSTOP)
    monkeypatch.setattr(opener_module, "OPEN_TIMEOUT", 1.0)
    for child in opener_module.POOL._idle:
        child[1].sock.settimeout(1.0)
    with Opener(hers) as o, pytest.raises(OperationTimeoutError):
        o.open(str(mine), write=False)
    with Opener(hers) as o:
        assert o.open(str(mine), write=False).name == str(mine)
        assert _child_of(o) != stuck
    assert not Path(f"/proc/{stuck}").exists() or "Z" in Path(f"/proc/{stuck}/stat").read_text().split()[2]

