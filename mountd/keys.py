"""The secrets a caller gives for one mount: passphrases by volume, and one passphrase (or key file) to try on
every locked volume and on a QEMU-encrypted image.

A :class:`Keys` never shows its secrets: its ``repr`` counts them, it is not part of a mount's record (the
journal), and the layers hand a secret to a tool by pipe, fd or a 0600 file removed at once, never in an
argument (``/proc/PID/cmdline`` is world-readable).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: The name under which a passphrase unlocks the image itself (QEMU's own encryption of qcow2), not a volume.
IMAGE = "image"


@dataclass(frozen=True, repr=False)
class Keys:
    """``by_volume``: volume name (``p3``, ``vg/root``, or :data:`IMAGE`) -> passphrase; ``everywhere``: tried
    on every locked volume and on the image, after any passphrase given for it by name."""

    by_volume: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    everywhere: bytes | None = None

    def for_volume(self, name: str) -> list[bytes]:
        """The secrets to try on ``name``, in order; empty: the caller gave none for it."""
        named = self.by_volume.get(name)
        return [s for s in (named, self.everywhere) if s is not None]

    def __bool__(self) -> bool:
        return bool(self.by_volume) or self.everywhere is not None

    def __repr__(self) -> str:
        return f"Keys(<{len(self.by_volume) + (self.everywhere is not None)} secrets>)"


NO_KEYS = Keys()
