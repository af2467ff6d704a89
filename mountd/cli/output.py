"""What the commands print: a result, or the one line a failure becomes; and their logger.

A result is text, or JSON with ``--json``. Every failure is one line on stderr naming the cause and the fix,
and an exit code per error kind (:mod:`mountd.errors`); with ``--json`` it is also printed as
``{"error": ..., "message": ...}``. Names that are not UTF-8 are shown as :func:`~mountd.model.display_name`
shows them (``\\xNN``), as the daemon does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from mountd.errors import MountdError
from mountd.model import MountInfo, MountState, display_name

if TYPE_CHECKING:
    import logging


def logger(*, debug: bool = False) -> logging.Logger:
    """The commands' logger, set up on first use: to stderr, WARNING and above, or everything with
    ``--debug`` (which sets it up first). Deferred: importing logging costs about 10 ms here (a third of a
    bare ``python -c pass``), and a command that has its answer from the daemon logs nothing."""
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    return logging.getLogger("mountd")


def mount_json(m: MountInfo) -> dict[str, Any]:
    return asdict(m)


def mounts_json(ms: list[MountInfo]) -> list[dict[str, Any]]:
    return [asdict(m) for m in ms]


def mount_text(m: MountInfo) -> str:
    mode = "read-only" if m.read_only else "read-write"
    lines = [f"{m.image}: {m.format}, {mode}, via {m.backend} {m.device} (id {m.id})"]
    lines += [f"  {v.name:<16} {v.filesystem:<6} {v.mountpoint}" for v in m.volumes]
    lines += [f"  note: {name}: {note}" for name, note in m.notes]
    return "\n".join(lines)


def mounts_text(ms: list[MountInfo]) -> str:
    return "\n".join(mount_text(m) + ("" if m.state == MountState.MOUNTED else f"\n  state: {m.state}")
                     for m in ms) or "nothing is mounted"


def guarded(prog: str, args: argparse.Namespace, action: Callable[[], Any], as_json: Callable[[Any], Any],
             as_text: Callable[[Any], str]) -> int:
    """Run ``action`` and print its result; the one place where exceptions become messages."""
    if args.debug:
        logger(debug=True)
    try:
        result = action()
    except MountdError as exc:
        return _fail(prog, args.json, exc.message, exc.exit_code, exc.dbus_name)
    except KeyboardInterrupt:
        return _fail(prog, args.json, "interrupted", 130, "Failed")
    except Exception:
        import uuid  # noqa: PLC0415 - only for an incident: it imports platform, a few ms of every start

        incident = uuid.uuid4().hex[:8]
        logger().error("incident %s", incident, exc_info=args.debug)
        return _fail(prog, args.json, f"internal error (incident {incident}): run again with --debug and "
                     "report it", 1, "Failed")
    print(json.dumps(_shown(as_json(result)), indent=2) if args.json else display_name(as_text(result)))
    return 0


def _shown(value: Any) -> Any:
    """A JSON result with every string as valid UTF-8 (:func:`~mountd.model.display_name`), as over D-Bus."""
    if isinstance(value, str):
        return display_name(value)
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shown(v) for v in value]
    return value


def _fail(prog: str, as_json: bool, message: str, code: int, name: str) -> int:
    message = display_name(message)
    if as_json:
        print(json.dumps({"error": name, "message": message}))
    print(f"{prog}: {message}", file=sys.stderr)
    return code
