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
from typing import Any

from .errors import MountdError
from .imageinfo import FORMATS
from .inspect import inspect_image
from .render import inspection_to_dict, render_tree

log = logging.getLogger("mountd")


def imgmount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgmount", description="Mount or inspect a virtual-machine disk image.")
    p.add_argument("image", help="the disk image file")
    p.add_argument("--info", action="store_true", help="show what the image holds; mount nothing")
    p.add_argument("--format", choices=FORMATS, help="the image format (default: probed, then pinned)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--debug", action="store_true", help="log every command run, and tracebacks")
    return p


def imgmount_main(argv: Sequence[str] | None = None) -> int:
    args = imgmount_parser().parse_args(argv)
    image = os.path.abspath(args.image)
    if not args.info:
        return _fail(args.json, "imgmount: mounting is not available yet: use --info to inspect the image", 2)
    return _guarded(args, lambda: inspect_image(image, fmt=args.format),
                    inspection_to_dict, render_tree)


def imgumount_main(argv: Sequence[str] | None = None) -> int:
    return _fail(False, "imgumount: nothing can be mounted yet, so there is nothing to unmount", 2)


def _guarded(args: argparse.Namespace, action: Callable[[], Any], as_json: Callable[[Any], Any],
             as_text: Callable[[Any], str]) -> int:
    """Run ``action`` and print its result; the one place where exceptions become messages."""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    try:
        result = action()
    except MountdError as exc:
        return _fail(args.json, f"imgmount: {exc.message}", exc.exit_code, exc.dbus_name)
    except KeyboardInterrupt:
        return _fail(args.json, "imgmount: interrupted", 130, "Failed")
    except Exception:
        incident = uuid.uuid4().hex[:8]
        log.error("incident %s", incident, exc_info=args.debug)
        return _fail(args.json, f"imgmount: internal error (incident {incident}): run again with --debug "
                     "and report it", 1, "Failed")
    print(json.dumps(as_json(result), indent=2) if args.json else as_text(result))
    return 0


def _fail(as_json: bool, message: str, code: int, name: str = "InvalidArgument") -> int:
    if as_json:
        print(json.dumps({"error": name, "message": message.split(": ", 1)[-1]}))
    print(message, file=sys.stderr)
    return code
