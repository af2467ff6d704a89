"""The ``imgmount`` and ``imgumount`` commands: their options, and whom they ask.

They call the daemon on the system bus (D-Bus activation starts it) through :mod:`mountd.cli.daemonclient`.
With no system bus, or no daemon that is running or can be activated, root runs the same engine in-process,
so a fresh machine needs no installed units for a first try; so does a command given ``IMGMOUNT_STATE_DIR``
(only an in-process engine can use another state directory). ``--info`` always runs in-process: it mounts
nothing, and reads the image with the caller's own rights. What they print, and how they fail, is
:mod:`mountd.cli.output`'s.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mountd.cli.daemonclient import DaemonClient, DaemonUnavailableError
from mountd.cli.keyinput import Locked, add_key_options, keys_from_args
from mountd.cli.output import guarded, logger, mount_json, mount_text, mounts_json, mounts_text
from mountd.errors import FailedError, InvalidArgumentError
from mountd.keys import NO_KEYS
from mountd.model import BACKENDS, MountInfo, MountRequest
from mountd.settings import STATE_DIR_ENV, Settings

if TYPE_CHECKING:
    from mountd.engine.engine import Engine

T = TypeVar("T")


class Mounter(Protocol):
    """What the commands need: the engine in-process, or the daemon over D-Bus."""

    def mounts(self) -> list[MountInfo]: ...

    def find(self, what: str) -> MountInfo: ...

    def mount(self, req: MountRequest) -> MountInfo: ...

    def unmount(self, mount_id: str, *, force: bool = False) -> None: ...


def imgmount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgmount", description="Mount or inspect a virtual-machine disk image.")
    p.add_argument("image", nargs="?", help="the disk image file")
    p.add_argument("--info", action="store_true", help="show what the image holds; mount nothing")
    p.add_argument("--list", action="store_true", help="list what imgmount has mounted")
    p.add_argument("--rw", action="store_true", help="mount read-write (default: read-only)")
    p.add_argument("--volume", action="append", default=[], metavar="NAME",
                   help="mount only this volume (p1, vg/lv, disk: see --info); repeatable")
    p.add_argument("--mount-root", metavar="DIR", help="where to make mountpoints (default /run/media/USER)")
    p.add_argument("--format", choices=_Formats(), metavar="FORMAT",
                   help="the image format: %(choices)s (default: probed, then pinned)")
    p.add_argument("--snapshot", metavar="NAME", help="mount a qcow2 internal snapshot (read-only)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="how to attach the image")
    p.add_argument("-o", "--option", action="append", default=[], metavar="OPT",
                   help="an extra mount option from the allowed list (noatime, noexec, ...); repeatable")
    add_key_options(p)
    _common(p)
    return p


class _Formats:
    """The image formats, as ``--format``'s choices: read from :mod:`mountd.image.imageinfo` only when
    argparse looks at them (``--format`` given, ``--help``, a usage error), so the other commands do not
    import it. (The option has a metavar: argparse would otherwise list the choices as it builds the
    parser.)"""

    def __iter__(self) -> Iterator[str]:  # also what ``in`` uses
        from mountd.image.imageinfo import FORMATS, OVA  # noqa: PLC0415 - deferred, as the class says
        return iter((*FORMATS, OVA))


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
    if args.list:
        return guarded("imgmount", args, _using(lambda m: m.mounts()), mounts_json, mounts_text)
    if not args.image:
        return guarded("imgmount", args, _usage("name an image (or use --list)"), dict, str)
    image = os.path.abspath(args.image)
    if args.info:
        from mountd.engine.render import inspection_to_dict, render_tree  # noqa: PLC0415 - deferred, as _engine() says
        return guarded("imgmount", args, lambda: _inspection(image, args.format, args), inspection_to_dict,
                       render_tree)

    def mount(mounter: Mounter) -> MountInfo:
        keys = keys_from_args(args, lambda: _locked(image, args.format, args.volume))
        return mounter.mount(MountRequest(
            image=image, read_only=not args.rw, volumes=tuple(args.volume),
            mount_root=args.mount_root and os.path.abspath(args.mount_root), format=args.format,
            snapshot=args.snapshot, backend=args.backend, mount_options=tuple(args.option), owner=os.getuid(),
            keys=keys))

    return guarded("imgmount", args, _using(mount), mount_json, mount_text)


def imgumount_main(argv: Sequence[str] | None = None) -> int:
    args = imgumount_parser().parse_args(argv)
    if args.all == bool(args.target):
        return guarded("imgumount", args, _usage("name one image, mountpoint or id, or --all"), dict, str)

    def unmount(mounter: Mounter) -> list[MountInfo]:
        targets = mounter.mounts() if args.all else [mounter.find(args.target)]
        for m in targets:
            mounter.unmount(m.id, force=args.force)
        return targets

    return guarded("imgumount", args, _using(unmount), mounts_json,
                   lambda ms: "\n".join(f"unmounted {m.image}" for m in ms) or "nothing was mounted")


def _using(action: Callable[[Mounter], T]) -> Callable[[], T]:
    """``action`` run against the daemon if there is one to talk to, else (as root) the in-process engine."""

    def run() -> T:
        client = None if os.environ.get(STATE_DIR_ENV) else DaemonClient.connect()
        if client is None:
            if os.geteuid() != 0:
                raise FailedError("the imgmount daemon is not reachable (no system bus, or imgmountd is not "
                                  "installed): install it with scripts/install, or run this as root")
            logger().debug("no imgmount daemon to talk to: running the engine in-process")
            return action(_engine())
        try:
            return action(client)
        except DaemonUnavailableError as exc:
            if os.geteuid() != 0:
                raise
            logger().warning("%s: running the engine in-process instead", exc.message)
            return action(_engine())
        finally:
            client.close()

    return run


def _engine() -> Engine:
    """The engine in-process, imported only here: a command that talks to the daemon needs none of it, and
    importing it costs a third of the command's start-up."""
    from mountd.engine.engine import Engine  # noqa: PLC0415

    logger()  # the engine's warnings go to stderr
    return Engine.started(Settings.from_environment())


def _inspection(image: str, fmt: str | None, args: argparse.Namespace | None = None) -> Any:
    """``--info``: the image inspected in-process (deferred, as :func:`_engine` is), read with the keys the
    command line gives (none asked for: ``--info`` shows what is locked)."""
    from mountd.engine.inspection import inspect_image  # noqa: PLC0415
    logger()
    from mountd.host.support import check_host  # noqa: PLC0415
    given = args is not None and (args.passphrase_stdin or args.key_file)
    keys = keys_from_args(args, lambda: []) if given and args is not None else NO_KEYS
    return inspect_image(image, fmt=fmt, host=check_host(), keys=keys)


def _locked(image: str, fmt: str | None, volumes: Sequence[str]) -> Locked:
    """What must be unlocked to mount ``volumes`` (all, if none are named): the image QEMU encrypted, or
    each locked volume, with what locks it."""
    from mountd.engine.unlocking import can_unlock, image_lock_kind, lock_kind  # noqa: PLC0415 - deferred
    from mountd.host.support import check_host  # noqa: PLC0415
    from mountd.keys import IMAGE  # noqa: PLC0415

    found = _inspection(image, fmt)
    if found.image.encryption:
        return [(IMAGE, image_lock_kind(found.image))]
    host = found.host or check_host()
    return [(v.name, lock_kind(v)) for v in found.volumes
            if lock_kind(v) and (v.name in volumes if volumes else can_unlock(v, host))]


def _usage(message: str) -> Callable[[], Any]:
    def fail() -> Any:
        raise InvalidArgumentError(message)

    return fail
