"""The ``imgmount`` and ``imgumount`` commands.

Every failure is one line on stderr naming the cause and the fix, and an exit code per error kind
(:mod:`mountd.errors`); ``--json`` prints machine-readable results, and errors as
``{"error": ..., "message": ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from .engine import BACKENDS, Engine, MountInfo, MountRequest
from .errors import InvalidArgumentError, MountdError
from .imageinfo import FORMATS
from .inspect import inspect_image
from .render import inspection_to_dict, render_tree

log = logging.getLogger("mountd")


def imgmount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgmount", description="Mount or inspect a virtual-machine disk image.")
    p.add_argument("image", nargs="?", help="the disk image file")
    p.add_argument("--info", action="store_true", help="show what the image holds; mount nothing")
    p.add_argument("--list", action="store_true", help="list what imgmount has mounted")
    p.add_argument("--rw", action="store_true", help="mount read-write (default: read-only)")
    p.add_argument("--volume", action="append", default=[], metavar="NAME",
                   help="mount only this volume (p1, vg/lv, disk: see --info); repeatable")
    p.add_argument("--mount-root", metavar="DIR", help="where to make mountpoints (default /run/media/USER)")
    p.add_argument("--format", choices=FORMATS, help="the image format (default: probed, then pinned)")
    p.add_argument("--snapshot", metavar="NAME", help="mount a qcow2 internal snapshot (read-only)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="how to attach the image")
    p.add_argument("-o", "--option", action="append", default=[], metavar="OPT",
                   help="an extra mount option from the allowed list (noatime, noexec, ...); repeatable")
    _common(p)
    return p


def imgumount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgumount", description="Unmount an image mounted by imgmount.")
    p.add_argument("target", nargs="?", help="the image, a mountpoint, or a mount id")
    p.add_argument("--all", action="store_true", help="unmount everything imgmount has mounted")
    p.add_argument("--force", action="store_true", help="lazy unmount as a last resort when busy")
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--debug", action="store_true", help="log every command run, and tracebacks")


def imgmount_main(argv: Sequence[str] | None = None) -> int:
    args = imgmount_parser().parse_args(argv)
    engine = Engine()
    if args.list:
        return _guarded("imgmount", args, engine.mounts, _mounts_json, _mounts_text)
    if not args.image:
        return _guarded("imgmount", args, _usage("name an image (or use --list)"), dict, str)
    image = os.path.abspath(args.image)
    if args.info:
        return _guarded("imgmount", args, lambda: inspect_image(image, fmt=args.format),
                        inspection_to_dict, render_tree)
    request = MountRequest(image=image, read_only=not args.rw, volumes=tuple(args.volume),
                           mount_root=args.mount_root and os.path.abspath(args.mount_root),
                           format=args.format, snapshot=args.snapshot, backend=args.backend,
                           mount_options=tuple(args.option), owner=os.getuid())
    return _guarded("imgmount", args, lambda: engine.mount(request), _mount_json, _mount_text)


def imgumount_main(argv: Sequence[str] | None = None) -> int:
    args = imgumount_parser().parse_args(argv)
    engine = Engine()
    if args.all == bool(args.target):
        return _guarded("imgumount", args, _usage("name one image, mountpoint or id, or --all"), dict, str)

    def unmount() -> list[MountInfo]:
        targets = engine.mounts() if args.all else [engine.find(_as_path(args.target))]
        for m in targets:
            engine.unmount(m.id, force=args.force)
        return targets

    return _guarded("imgumount", args, unmount, _mounts_json,
                    lambda ms: "\n".join(f"unmounted {m.image}" for m in ms) or "nothing was mounted")


def _as_path(target: str) -> str:
    return os.path.abspath(target) if os.path.exists(target) else target


def _usage(message: str) -> Callable[[], Any]:
    def fail() -> Any:
        raise InvalidArgumentError(message)

    return fail


def _mount_json(m: MountInfo) -> dict[str, Any]:
    return asdict(m)


def _mounts_json(ms: list[MountInfo]) -> list[dict[str, Any]]:
    return [asdict(m) for m in ms]


def _mount_text(m: MountInfo) -> str:
    mode = "read-only" if m.read_only else "read-write"
    lines = [f"{m.image}: {m.format}, {mode}, via {m.backend} {m.device} (id {m.id})"]
    lines += [f"  {v.name:<16} {v.filesystem:<6} {v.mountpoint}" for v in m.volumes]
    return "\n".join(lines)


def _mounts_text(ms: list[MountInfo]) -> str:
    return "\n".join(_mount_text(m) + ("" if m.state == "mounted" else f"\n  state: {m.state}")
                     for m in ms) or "nothing is mounted"


def _guarded(prog: str, args: argparse.Namespace, action: Callable[[], Any], as_json: Callable[[Any], Any],
             as_text: Callable[[Any], str]) -> int:
    """Run ``action`` and print its result; the one place where exceptions become messages."""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    try:
        result = action()
    except MountdError as exc:
        return _fail(prog, args.json, exc.message, exc.exit_code, exc.dbus_name)
    except KeyboardInterrupt:
        return _fail(prog, args.json, "interrupted", 130, "Failed")
    except Exception:
        incident = uuid.uuid4().hex[:8]
        log.error("incident %s", incident, exc_info=args.debug)
        return _fail(prog, args.json, f"internal error (incident {incident}): run again with --debug and "
                     "report it", 1, "Failed")
    print(json.dumps(as_json(result), indent=2) if args.json else as_text(result))
    return 0


def _fail(prog: str, as_json: bool, message: str, code: int, name: str) -> int:
    if as_json:
        print(json.dumps({"error": name, "message": message}))
    print(f"{prog}: {message}", file=sys.stderr)
    return code
