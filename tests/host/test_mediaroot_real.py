"""``mountd.host.mediaroot`` on real directories: a private mount root lets its user in and keeps everyone else out,
checked by running ``ls`` and ``cat`` as those users; old 0755 roots are fixed at start-up; symlinks, files,
other users' directories and unsafe parents are refused and left untouched; a second call writes nothing."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.errors import InvalidArgumentError, UnsupportedError
from mountd.host.mediaroot import ACCESS_ACL, acl_blob, ensure_private_root, fix_existing_roots
from mountd.layers.mount import _check_safe_parent

SECRET = "only for daemon\n"


def account(name: str) -> tuple[int, int]:
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def supports_acls(directory: Path) -> bool:
    probe = Path(tempfile.mkdtemp(dir=directory))
    try:
        os.setxattr(probe, ACCESS_ACL, acl_blob(0))
        return True
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        return False
    finally:
        probe.rmdir()


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory under /run on a filesystem with POSIX ACLs (a tmpfs mounted on it if
    /run has none); removed afterwards."""
    top = Path(tempfile.mkdtemp(dir="/run", prefix="imgmount-mediaroot-"))
    mounted = False
    try:
        if not supports_acls(top):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=4m", "imgmount-test", str(top)],
                           check=True)
            mounted = True
            assert supports_acls(top), "neither /run nor tmpfs supports POSIX ACLs here"
        top.chmod(0o755)
        yield top
    finally:
        if mounted:
            umount(top)
        shutil.rmtree(top)


def run_as(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    uid, gid = account(user)
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
                          capture_output=True, text=True, cwd="/", env={"LC_ALL": "C", "PATH": os.defpath},
                          check=False, timeout=30)


def assert_allowed(user: str, *argv: str) -> str:
    proc = run_as(user, *argv)
    assert proc.returncode == 0, f"{user}: {argv}: {proc.stderr}"
    return proc.stdout


def assert_denied(user: str, *argv: str) -> None:
    proc = run_as(user, *argv)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, f"{user}: {argv}: {proc}"


def assert_private(root: Path, owner: int) -> None:
    st = root.lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o750)
    assert os.getxattr(root, ACCESS_ACL, follow_symlinks=False) == acl_blob(owner)
    _check_safe_parent(str(root))  # the mount layer still accepts it as a mount root


def with_volume(root: Path) -> Path:
    """A stand-in for a mounted filesystem's root directory: 0755, holding a world-readable file."""
    volume = root / "disk"
    volume.mkdir()
    volume.chmod(0o755)
    secret = volume / "secret.txt"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    return secret


def state(path: Path) -> tuple[int, int, int, int, bytes | None]:
    st = path.lstat()
    try:
        acl = os.getxattr(path, ACCESS_ACL, follow_symlinks=False)
    except OSError:
        acl = None
    return st.st_uid, st.st_gid, st.st_mode, st.st_ctime_ns, acl


# ---- who gets in --------------------------------------------------------------------------------------------


def test_only_the_owner_can_list_the_root_and_read_below_it(base: Path) -> None:
    root = base / "daemon"
    ensure_private_root(str(root), account("daemon")[0])
    assert_private(root, account("daemon")[0])
    secret = with_volume(root)

    assert assert_allowed("daemon", "ls", str(root)).split() == ["disk"]
    assert assert_allowed("daemon", "cat", str(secret)) == SECRET
    assert_denied("daemon", "touch", str(root / "planted"))  # may look, never rename or plant
    for outsider in ("nobody", "bin"):
        assert_denied(outsider, "ls", str(root))
        assert_denied(outsider, "cat", str(secret))


def test_roots_own_root_has_no_acl_and_lets_nobody_else_in(base: Path) -> None:
    root = base / "root"
    ensure_private_root(str(root), 0)
    st = root.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o750)
    with pytest.raises(OSError) as exc:
        os.getxattr(root, ACCESS_ACL)
    assert exc.value.errno == errno.ENODATA
    secret = with_volume(root)
    for outsider in ("daemon", "nobody"):
        assert_denied(outsider, "ls", str(root))
        assert_denied(outsider, "cat", str(secret))


def test_missing_parents_are_made_root_owned_0755_whatever_the_umask(base: Path) -> None:
    root = base / "media" / "daemon"
    old = os.umask(0o077)
    try:
        ensure_private_root(str(root), account("daemon")[0])
    finally:
        os.umask(old)
    st = root.parent.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)
    assert_private(root, account("daemon")[0])
    assert_allowed("daemon", "ls", str(root))


# ---- idempotence and repair ---------------------------------------------------------------------------------


def test_a_second_call_writes_nothing(base: Path) -> None:
    root = base / "daemon"
    ensure_private_root(str(root), account("daemon")[0])
    before = state(root)
    ensure_private_root(str(root), account("daemon")[0])
    assert state(root) == before  # same mode, same ACL bytes, and not even the ctime moved


def test_an_old_0755_root_is_fixed_at_start_up(base: Path) -> None:
    uid = account("daemon")[0]
    old = base / "daemon"
    old.mkdir()
    old.chmod(0o755)
    secret = with_volume(old)
    assert_allowed("nobody", "cat", str(secret))  # the leak being fixed

    assert fix_existing_roots(str(base)) == [str(old)]
    assert_private(old, uid)
    assert_denied("nobody", "cat", str(secret))
    assert_allowed("daemon", "cat", str(secret))
    assert fix_existing_roots(str(base)) == []  # nothing left to fix


def test_fix_existing_roots_takes_uids_and_skips_what_is_not_a_roots_directory(base: Path) -> None:
    numeric, by_name, users, unknown = base / "4242", base / "root", base / "bin", base / "no-such-user-x"
    for path in (numeric, by_name, users, unknown):
        path.mkdir()
        path.chmod(0o755)
    os.chown(users, *account("bin"))
    target = base / "target"  # not a user name: skipped itself
    target.mkdir()
    target.chmod(0o755)
    (base / "daemon").symlink_to(target)
    (base / "nobody").write_text("a file\n")
    untouched = {p: state(p) for p in (users, unknown, target, base / "daemon", base / "nobody")}

    assert fix_existing_roots(str(base)) == [str(numeric), str(by_name)]
    assert_private(numeric, 4242)
    assert stat.S_IMODE(by_name.lstat().st_mode) == 0o750
    assert {p: state(p) for p in untouched} == untouched
    assert (base / "daemon").is_symlink()


def test_fix_existing_roots_without_a_base_does_nothing(base: Path) -> None:
    assert fix_existing_roots(str(base / "missing")) == []


# ---- what is refused ----------------------------------------------------------------------------------------


def test_a_symlink_in_place_of_the_root_is_refused_and_left_alone(base: Path) -> None:
    target = base / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    root = base / "daemon"
    root.symlink_to(target)
    before = state(target)
    with pytest.raises(InvalidArgumentError, match="is a symlink or not a directory"):
        ensure_private_root(str(root), account("daemon")[0])
    assert root.is_symlink() and os.readlink(root) == str(target)
    assert state(target) == before


def test_a_symlink_on_the_way_to_the_root_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir()
    (base / "media").symlink_to(real)
    with pytest.raises(InvalidArgumentError, match="is a symlink or not a directory"):
        ensure_private_root(str(base / "media" / "daemon"), account("daemon")[0])
    assert os.listdir(real) == []


def test_a_file_in_place_of_the_root_is_refused(base: Path) -> None:
    root = base / "daemon"
    root.write_text("not a directory\n")
    with pytest.raises(InvalidArgumentError, match="is a symlink or not a directory"):
        ensure_private_root(str(root), account("daemon")[0])
    assert root.read_text() == "not a directory\n"


def test_a_root_someone_else_owns_is_refused_and_left_alone(base: Path) -> None:
    root = base / "daemon"
    root.mkdir()
    os.chown(root, *account("daemon"))
    before = state(root)
    with pytest.raises(InvalidArgumentError, match="is not owned by root"):
        ensure_private_root(str(root), account("daemon")[0])
    assert state(root) == before


def test_a_parent_others_can_write_is_refused(base: Path) -> None:
    parent = base / "open"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(InvalidArgumentError, match="can be changed by users other than root"):
        ensure_private_root(str(parent / "daemon"), account("daemon")[0])
    assert os.listdir(parent) == []


@pytest.mark.parametrize("root", ["relative/daemon", "/run/media/../media/daemon", "/"])
def test_paths_that_are_not_plain_absolute_are_refused(root: str) -> None:
    with pytest.raises(InvalidArgumentError, match="normalised absolute path"):
        ensure_private_root(root, 1)


def test_a_filesystem_without_acls_is_an_error_and_the_root_stays_closed(base: Path) -> None:
    ramfs = base / "ramfs"
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0755", "imgmount-test", str(ramfs)], check=True)
    try:
        old = ramfs / "daemon"
        old.mkdir()
        old.chmod(0o755)
        for root in (old, ramfs / "new"):
            with pytest.raises(UnsupportedError, match=r"lacks POSIX ACLs.*mount it with the acl option"):
                ensure_private_root(str(root), account("daemon")[0])
            st = root.lstat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o750)
            assert_denied("nobody", "ls", str(root))
        assert fix_existing_roots(str(ramfs)) == []  # logged, not raised: start-up goes on
    finally:
        umount(ramfs)

