"""The keys a Mount call carries (mountd.service.keyoptions) and the ones the command reads
(mountd.cli.keyinput): counts, sizes, kinds of key file, and bounded reading of a pipe."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.cli import keyinput
from mountd.errors import InvalidArgumentError
from mountd.host.qemusecret import MAX_KEY_SIZE
from mountd.keys import NO_KEYS, Keys
from mountd.service import keyoptions
from mountd.service.keyoptions import MAX_PASSPHRASES, key_file_fd, keys_from, read_key_file


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):  # closed by the test already
            os.close(fd)


def test_passphrases_by_name_and_a_key_file_for_everywhere(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"\x00binary\xffkey")
    fd = os.open(key, os.O_RDONLY)
    try:
        keys = keys_from({"p2": "pw", "image": "other"}, fd)
    finally:
        os.close(fd)
    assert keys.for_volume("p2") == [b"pw", b"\x00binary\xffkey"]
    assert keys.for_volume("p9") == [b"\x00binary\xffkey"]
    assert "pw" not in repr(keys) and "binary" not in repr(keys)


@pytest.mark.parametrize(("passphrases", "cause"), [
    ({f"p{i}": "x" for i in range(MAX_PASSPHRASES + 1)}, "at most 256 passphrases"),
    ({"p1": ""}, "a passphrase is empty"),
    ({"p1": "x" * (MAX_KEY_SIZE // 2 + 1), "p2": "y" * (MAX_KEY_SIZE // 2)}, "more than 8 MiB"),
])
def test_passphrase_bounds(passphrases: dict[str, str], cause: str) -> None:
    with pytest.raises(InvalidArgumentError, match=cause):
        keys_from(passphrases, -1)


def test_key_file_option_names_a_sent_fd() -> None:
    assert key_file_fd({}, [7]) == -1
    assert key_file_fd({"key-file": 0}, [7]) == 7
    for index in (1, -1):
        with pytest.raises(InvalidArgumentError, match="names no file descriptor"):
            key_file_fd({"key-file": index}, [7])


def test_key_file_kinds(tmp_path: Path) -> None:
    empty, big = tmp_path / "empty", tmp_path / "big"
    empty.write_bytes(b"")
    big.write_bytes(b"k" * (MAX_KEY_SIZE + 1))
    cases = [(os.open(empty, os.O_RDONLY), "is empty"), (os.open(big, os.O_RDONLY), "larger than 8 MiB"),
             (os.open(big, os.O_WRONLY), "not open for reading"), (os.open(tmp_path, os.O_RDONLY), "a pipe"),
             (os.open("/dev/zero", os.O_RDONLY), "regular file or a pipe")]
    for fd, cause in cases:
        try:
            with pytest.raises(InvalidArgumentError, match=cause):
                read_key_file(fd)
        finally:
            os.close(fd)


def test_a_key_file_that_is_a_pipe(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"from a pipe")
    os.close(w)
    assert read_key_file(r) == b"from a pipe"
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"from a socket")
        a.shutdown(socket.SHUT_WR)
        assert read_key_file(b.fileno()) == b"from a socket"


def test_a_pipe_that_never_ends_is_bounded_in_time(pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyoptions, "PIPE_TIMEOUT", 0.3)
    r, w = pipe
    os.write(w, b"partial")
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="did not end within"):
        read_key_file(r)
    assert time.monotonic() - started < 2


def test_passphrase_stdin_is_its_first_line() -> None:
    assert keyinput._passphrase(io.BytesIO(b"secret\r\nrest")) == b"secret"
    assert keyinput._passphrase(io.BytesIO(b"no newline")) == b"no newline"
    with pytest.raises(InvalidArgumentError, match="no passphrase"):
        keyinput._passphrase(io.BytesIO(b"\n"))
    with pytest.raises(InvalidArgumentError, match="over 8 MiB"):
        keyinput._passphrase(io.BytesIO(b"x" * (keyinput.MAX_KEY_SIZE + 1)))


def test_the_key_for_everywhere_goes_to_the_daemon_in_a_memfd() -> None:
    with keyinput.everywhere_fd(Keys(everywhere=b"\x00\x01key")) as fd:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        assert read_key_file(fd) == b"\x00\x01key"
    with keyinput.everywhere_fd(NO_KEYS) as fd:
        assert fd == -1
