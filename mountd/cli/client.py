"""A small synchronous D-Bus client: what the commands need to call imgmountd, and nothing else.

The commands run once and exit, so their start-up is most of their cost: dbus-fast and asyncio take longer
to import than the whole call takes (issue 11, item 5). This client is one blocking unix socket: SASL
``EXTERNAL`` with our uid, ``Hello``, then method calls, each waiting for its reply (signals and other
messages are skipped). It marshals every D-Bus type in the D-Bus wire format (specification: "Message
Protocol"); it sends little-endian and reads either order. A call may carry unix fds (an ``h`` value is an
index into them), sent with the message as SCM_RIGHTS, once the bus agreed to pass them
(NEGOTIATE_UNIX_FD). Variants are sent as :class:`Variant` and read back as their plain values. Records
are named tuples: they cost a fifth of a dataclass to define.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple
from urllib.parse import unquote

SYSTEM_BUS_ENV = "DBUS_SYSTEM_BUS_ADDRESS"
SYSTEM_BUS_DEFAULT = "unix:path=/var/run/dbus/system_bus_socket"
DRIVER = "org.freedesktop.DBus"  # the bus itself: its name, and its interface
ALLOW_INTERACTIVE_AUTHORIZATION = 0x4  # a message flag: polkit may ask the user for a password
MAX_MESSAGE = 128 * 1024 * 1024  # the specification's limit

_METHOD_CALL, _METHOD_RETURN, _ERROR = 1, 2, 3
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, _REPLY_SERIAL, _DESTINATION, _SIGNATURE = 1, 2, 3, 4, 5, 6, 8
_UNIX_FDS = 9
# Fixed-size types: struct format (also their size and alignment).
_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "h": "I", "x": "q", "t": "Q", "d": "d"}
_ALIGN = {**{t: struct.calcsize(f) for t, f in _FIXED.items()}, "s": 4, "o": 4, "g": 1, "a": 4, "v": 1,
          "(": 8, "{": 8}


class BusError(Exception):
    """No bus to talk to: no usable address, the connection or authentication failed, or it was lost."""


class Variant(NamedTuple):
    signature: str
    value: Any


class Call(NamedTuple):
    """One method call; ``body`` holds one value for each complete type of ``signature``."""

    destination: str
    path: str
    interface: str
    member: str
    signature: str = ""
    body: Sequence[Any] = ()
    flags: int = 0
    fds: Sequence[int] = ()  # sent with the call; an ``h`` value in ``body`` is an index into them


def driver_call(member: str, signature: str = "", body: Sequence[Any] = ()) -> Call:
    """A call to the bus itself (``org.freedesktop.DBus``)."""
    return Call(DRIVER, "/org/freedesktop/DBus", DRIVER, member, signature, body)


class Reply(NamedTuple):
    error: str | None  # the D-Bus error name; the body's first string is its message
    body: list[Any]


def system_bus_address() -> str:
    return os.environ.get(SYSTEM_BUS_ENV) or SYSTEM_BUS_DEFAULT


# --- signatures and the wire format -----------------------------------------------------------------------


def _type_end(sig: str, i: int) -> int:
    """The index just past the one complete type that starts at ``sig[i]``."""
    if sig[i] == "a":
        return _type_end(sig, i + 1)
    if sig[i] in "({":
        close = ")" if sig[i] == "(" else "}"
        i += 1
        while sig[i] != close:
            i = _type_end(sig, i)
        return i + 1
    if sig[i] not in _ALIGN:
        raise ValueError(f"unsupported D-Bus type {sig[i]!r} in {sig!r}")
    return i + 1


def split_signature(sig: str) -> list[str]:
    """``"sa{sv}"`` -> ``["s", "a{sv}"]``."""
    types, i = [], 0
    while i < len(sig):
        end = _type_end(sig, i)
        types.append(sig[i:end])
        i = end
    return types


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def align(self, n: int) -> None:
        self.buf += b"\0" * (-len(self.buf) % n)

    def write(self, sig: str, value: Any) -> None:
        t = sig[0]
        if t in _FIXED:
            self.align(_ALIGN[t])
            self.buf += struct.pack("<" + _FIXED[t], int(value) if t == "b" else value)
        elif t in "so":
            data = value.encode()
            self.write("u", len(data))
            self.buf += data + b"\0"
        elif t == "g":
            self.buf += bytes([len(value)]) + value.encode() + b"\0"
        elif t == "v":
            self.write("g", value.signature)
            self.write(value.signature, value.value)
        elif t == "a":
            self._array(sig[1:], value.items() if sig[1] == "{" else value)
        else:  # a struct or a dict entry
            self.align(8)
            for field_sig, field in zip(split_signature(sig[1:-1]), value, strict=True):
                self.write(field_sig, field)

    def _array(self, element: str, items: Any) -> None:
        self.align(4)
        at = len(self.buf)
        self.buf += b"\0\0\0\0"
        self.align(_ALIGN[element[0]])
        start = len(self.buf)
        for item in items:
            self.write(element, item)
        struct.pack_into("<I", self.buf, at, len(self.buf) - start)


class _Reader:
    def __init__(self, data: bytes, order: str, pos: int = 0) -> None:
        self.data, self.order, self.pos = data, order, pos

    def align(self, n: int) -> None:
        self.pos += -self.pos % n

    def read(self, sig: str) -> Any:
        t = sig[0]
        if t in _FIXED:
            self.align(_ALIGN[t])
            (value,) = struct.unpack_from(self.order + _FIXED[t], self.data, self.pos)
            self.pos += _ALIGN[t]
            return bool(value) if t == "b" else value
        if t in "sog":
            size = self.read("y" if t == "g" else "u")
            text = self.data[self.pos:self.pos + size].decode()
            self.pos += size + 1
            return text
        if t == "v":
            return self.read(self.read("g"))
        if t == "a":
            return self._array(sig[1:])
        self.align(8)
        return tuple(self.read(field_sig) for field_sig in split_signature(sig[1:-1]))

    def _array(self, element: str) -> Any:
        size = self.read("u")
        self.align(_ALIGN[element[0]])
        end = self.pos + size
        if end > len(self.data):
            raise BusError("a malformed message: an array runs past its end")
        items = []
        while self.pos < end:
            items.append(self.read(element))
        return dict(items) if element[0] == "{" else items


def marshal_call(serial: int, call: Call) -> bytes:
    """One METHOD_CALL message, little-endian."""
    payload = _Writer()
    for sig, value in zip(split_signature(call.signature), call.body, strict=True):
        payload.write(sig, value)
    fields = [(_PATH, Variant("o", call.path)), (_INTERFACE, Variant("s", call.interface)),
              (_MEMBER, Variant("s", call.member)), (_DESTINATION, Variant("s", call.destination))]
    if call.signature:
        fields.append((_SIGNATURE, Variant("g", call.signature)))
    if call.fds:
        fields.append((_UNIX_FDS, Variant("u", len(call.fds))))
    msg = _Writer()
    msg.buf += struct.pack("<cBBBII", b"l", _METHOD_CALL, call.flags, 1, len(payload.buf), serial)
    msg.write("a(yv)", fields)
    msg.align(8)
    return bytes(msg.buf + payload.buf)


class Message(NamedTuple):
    kind: int
    fields: dict[int, Any]
    body: list[Any]


def unmarshal(data: bytes) -> Message:
    """One whole message (as :func:`message_size` measured it)."""
    order = {b"l": "<", b"B": ">"}.get(data[:1])
    if order is None:
        raise BusError("a malformed message: unknown byte order")
    header = _Reader(data, order, 12)
    fields = dict(header.read("a(yv)"))
    header.align(8)
    payload = _Reader(data[header.pos:], order)
    body = [payload.read(sig) for sig in split_signature(fields.get(_SIGNATURE, ""))]
    return Message(data[1], fields, body)


def message_size(head: bytes) -> int:
    """The whole size of a message from its first 16 bytes."""
    order = {b"l": "<", b"B": ">"}.get(head[:1], "<")
    body, fields = struct.unpack_from(order + "I4xI", head, 4)
    size = 16 + fields + (-(16 + fields) % 8) + body
    if size > MAX_MESSAGE:
        raise BusError(f"a malformed message: {size} bytes")
    return int(size)


# --- the connection ---------------------------------------------------------------------------------------


def _socket_addresses(address: str) -> Iterator[str | bytes]:
    """The unix socket addresses in a D-Bus address list (``unix:path=...;unix:abstract=...``)."""
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        keys = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if "path" in keys:
            yield unquote(keys["path"])
        elif "abstract" in keys:
            yield b"\0" + unquote(keys["abstract"]).encode()


class BusConnection:
    """One authenticated connection to a bus; :meth:`call` blocks until the reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.serial = 0
        self.buffered = bytearray()
        self.unix_fds = False  # the bus agreed to pass file descriptors

    @classmethod
    def connect(cls, address: str, timeout: float) -> BusConnection:
        """Connect, authenticate and say Hello, within ``timeout`` seconds; BusError (or OSError) if not."""
        error: OSError | None = None
        for where in _socket_addresses(address):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(where)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            conn = cls(sock)
            try:
                conn._hello()
            except BaseException:
                conn.close()
                raise
            sock.settimeout(None)  # a call waits as long as the bus lets it (the bus answers NoReply)
            return conn
        raise error or BusError(f"no unix socket in the bus address {address!r}")

    def close(self) -> None:
        self.sock.close()

    def _hello(self) -> None:
        uid = str(os.geteuid()).encode().hex()
        self.sock.sendall(f"\0AUTH EXTERNAL {uid}\r\n".encode())
        line = self._line()
        if not line.startswith(b"OK "):
            raise BusError(f"the bus refused us: {line.decode(errors='replace').strip()}")
        self.sock.sendall(b"NEGOTIATE_UNIX_FD\r\n")
        self.unix_fds = self._line().startswith(b"AGREE_UNIX_FD")
        self.sock.sendall(b"BEGIN\r\n")
        hello = self.call(driver_call("Hello"))
        if hello.error:
            raise BusError(f"the bus refused Hello: {hello.error}")

    def call(self, call: Call) -> Reply:
        self.serial += 1
        data = marshal_call(self.serial, call)
        if call.fds:
            if not self.unix_fds:
                raise BusError("the bus does not pass file descriptors")
            sent = socket.send_fds(self.sock, [data], list(call.fds))
            data = data[sent:]
        self.sock.sendall(data)
        while True:
            msg = unmarshal(self._message())
            if msg.kind in (_METHOD_RETURN, _ERROR) and msg.fields.get(_REPLY_SERIAL) == self.serial:
                return Reply(msg.fields.get(_ERROR_NAME, "") if msg.kind == _ERROR else None, msg.body)

    def _message(self) -> bytes:
        head = self._exactly(16)
        return head + self._exactly(message_size(head) - 16)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffered:
            self._fill()
        line, _, rest = bytes(self.buffered).partition(b"\r\n")
        self.buffered = bytearray(rest)
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buffered) < size:
            self._fill()
        data = bytes(self.buffered[:size])
        del self.buffered[:size]
        return data

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BusError("the bus closed the connection")
        self.buffered += chunk
