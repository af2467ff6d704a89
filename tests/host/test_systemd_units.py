"""The files around the daemon (systemd/, scripts/install), checked with the programs that read them.

``scripts/install --root`` installs into a temporary root that holds a copy of the host's systemd units, so
``systemd-analyze verify`` sees the unit exactly where a real install puts it, next to the real ExecStart=.
dbus-daemon and polkitd load the installed files for real (imgmount_testkit/bus.py, polkit.py). Nothing here
touches the host's /etc, /usr or /opt.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.bus import Bus, BusStartError, name_owner, private_bus
from imgmount_testkit.polkit import polkitd

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install"
BUS_NAME = "io.github.imgmount.Mountd1"
MANAGER_PATH = "/io/github/imgmount/Mountd1"
VENV = "/opt/imgmount"
DAEMON = f"{VENV}/bin/imgmountd"
UNIT = "/usr/local/lib/systemd/system/imgmountd.service"
# Where each file of systemd/ (and the interface description) goes, and its mode: the paths the readers (systemd, dbus, polkit, desktops)
# look in.
TARGETS = {
    "systemd/imgmountd.service": (UNIT, 0o644),
    f"systemd/{BUS_NAME}.conf": (f"/usr/share/dbus-1/system.d/{BUS_NAME}.conf", 0o644),
    f"systemd/{BUS_NAME}.service": (f"/usr/share/dbus-1/system-services/{BUS_NAME}.service", 0o644),
    f"mountd/data/{BUS_NAME}.xml": (f"/usr/share/dbus-1/interfaces/{BUS_NAME}.xml", 0o644),
    "systemd/io.github.imgmount.policy": ("/usr/share/polkit-1/actions/io.github.imgmount.policy", 0o644),
    "systemd/imgmount.desktop": ("/usr/local/share/applications/imgmount.desktop", 0o644),
    "systemd/imgmount.sysusers.conf": ("/usr/local/lib/sysusers.d/imgmount.conf", 0o644),
    "systemd/60-imgmount.rules": ("/etc/udev/rules.d/60-imgmount.rules", 0o644),
    "systemd/imgmount-open": ("/usr/local/bin/imgmount-open", 0o755),
}
POLKIT_ACTIONS = ("io.github.imgmount.mount", "io.github.imgmount.mount-read-write",
                  "io.github.imgmount.unmount-others")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def need(program: str, package: str) -> str:
    """The path of a program the test needs; a missing one fails the test (scripts/setup installs it)."""
    found = shutil.which(program) or (program if os.access(program, os.X_OK) else None)
    if found is None:
        pytest.fail(f"{program} is missing: install the Debian package {package} (scripts/setup)")
    return found


def run(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120, env=env, cwd=cwd)


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every non-directory under root: relative path -> (mtime_ns, size)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            st = (Path(dirpath) / name).lstat()
            found[str((Path(dirpath) / name).relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return found


@dataclass(frozen=True)
class Installed:
    root: Path
    before: frozenset[str]  # files the root held before scripts/install ran
    output: str


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A root holding the host's systemd units (as a real one does), then scripts/install --root into it."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")  # merged /usr, as on Debian 12
    before = frozenset(files_under(root))
    result = run([str(INSTALL), "--root", str(root)])
    assert result.returncode == 0, result.stderr
    return Installed(root, before, result.stdout)


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for each assignment of a unit file, in order; keys may repeat."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(path) if (s, k) == (section, key)]


# ---- scripts/install ------------------------------------------------------------------------------------

def test_install_puts_each_file_in_place(installed: Installed) -> None:
    for source, (target, mode) in TARGETS.items():
        placed = installed.root / target.lstrip("/")
        assert placed.read_bytes() == (REPO / source).read_bytes(), target
        assert stat.S_IMODE(placed.stat().st_mode) == mode, target
    for command in ("imgmount", "imgumount"):
        assert os.readlink(installed.root / "usr/local/bin" / command) == f"{VENV}/bin/{command}"
        assert os.access(installed.root / VENV.lstrip("/") / "bin" / command, os.X_OK)
    assert os.access(installed.root / DAEMON.lstrip("/"), os.X_OK)
    assert "skipped: creating group imgmount" in installed.output
    assert "skipped: reloading systemd" in installed.output


def test_installed_package_runs(installed: Installed) -> None:
    venv_python = installed.root / VENV.lstrip("/") / "bin/python"
    # From /, as systemd starts it: "python -c" would otherwise find the checkout in the working directory.
    result = run([str(venv_python), "-c", "import mountd.service.daemon, mountd.cli.main; print(mountd.cli.main.__file__)"],
                 cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(installed.root / VENV.lstrip("/"))), "runs the copy, not the checkout"
    # The interface description is package data: the installed package carries it.
    shipped = run([str(venv_python), "-c", "from importlib import resources; "
                   f"print(resources.files('mountd').joinpath('data/{BUS_NAME}.xml').read_text())"], cwd="/")
    assert shipped.stdout.rstrip("\n") == (REPO / f"mountd/data/{BUS_NAME}.xml").read_text().rstrip("\n")


def test_install_again_changes_nothing(installed: Installed) -> None:
    before = files_under(installed.root)
    result = run([str(INSTALL), "--root", str(installed.root)])
    assert result.returncode == 0, result.stderr
    assert "installed " not in result.stdout
    assert result.stdout.count("unchanged ") == len(TARGETS) + 3  # the files, two links, the package
    assert files_under(installed.root) == before


def test_uninstall_removes_everything_it_installed(installed: Installed, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(installed.root, root, symlinks=True)
    result = run([str(INSTALL), "--root", str(root), "--uninstall"])
    assert result.returncode == 0, result.stderr
    assert set(files_under(root)) == installed.before
    again = run([str(INSTALL), "--root", str(root), "--uninstall"])
    assert again.returncode == 0, again.stderr
    assert "removed" not in again.stdout


def test_uninstall_leaves_a_venv_it_did_not_make(tmp_path: Path) -> None:
    foreign = tmp_path / VENV.lstrip("/") / "precious"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("not ours")
    result = run([str(INSTALL), "--root", str(tmp_path), "--uninstall"])
    assert result.returncode == 0, result.stderr
    assert foreign.read_text() == "not ours"
    assert f"{VENV} exists but was not made by scripts/install: left alone" in result.stdout


def test_install_on_the_real_system_needs_root() -> None:
    result = run([*NOBODY, str(INSTALL)])
    assert result.returncode == 1
    assert "run me as root" in result.stderr


# ---- the unit ---------------------------------------------------------------------------------------------

def test_unit_passes_systemd_analyze_verify(installed: Installed) -> None:
    analyze = need("systemd-analyze", "systemd")
    result = run([analyze, "verify", f"--root={installed.root}", UNIT])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The same check sees a broken unit: verify only warns about unknown keys, hence the empty output above.
    typo = installed.root / "usr/local/lib/systemd/system/imgmountd-typo.service"
    typo.write_text((installed.root / UNIT.lstrip("/")).read_text().replace("KillMode=", "KillMod="))
    try:
        broken = run([analyze, "verify", f"--root={installed.root}", "/" + str(typo.relative_to(installed.root))])
        assert "Unknown key 'KillMod'" in broken.stderr
    finally:
        typo.unlink()


def test_unit_is_a_dbus_service_that_keeps_its_servers_and_journal() -> None:
    unit = REPO / "systemd/imgmountd.service"
    expect = {"Type": "dbus", "BusName": BUS_NAME, "ExecStart": DAEMON, "KillMode": "process",
              "RuntimeDirectory": "imgmount", "RuntimeDirectoryPreserve": "yes"}
    assert {k: unit_values(unit, "Service", k) for k in expect} == {k: [v] for k, v in expect.items()}
    after = " ".join(unit_values(unit, "Unit", "After")).split()
    assert {"local-fs.target", "remote-fs.target", "dbus.service"} <= set(after)
    assert unit_values(unit, "Unit", "DefaultDependencies") in ([], ["yes"]), "stopped at shutdown"
    (timeout,) = unit_values(unit, "Service", "TimeoutStopSec")
    parsed = run([need("systemd-analyze", "systemd"), "timespan", timeout])
    micros = re.search(r"μs: (\d+)", parsed.stdout)
    assert micros is not None and int(micros.group(1)) >= 120_000_000, "flushing images takes time"


# Options that give the service a mount namespace of its own (its mounts would be invisible to the host),
# a user namespace (no real mounts at all), a device allow-list (no /dev/loop*, /dev/nbd*, /dev/fuse), or
# take away what mounting needs (root, CAP_SYS_ADMIN, the mount system calls, file system types).
FORBIDDEN = {
    "PrivateMounts", "MountFlags", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectClock", "ProtectProc", "ProcSubset", "ProtectHostname", "ReadOnlyPaths", "ReadWritePaths",
    "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
    "RootDirectory", "RootImage", "MountImages", "ExtensionImages", "ExtensionDirectories", "PrivateUsers",
    "DynamicUser", "DevicePolicy", "DeviceAllow", "User", "Group", "CapabilityBoundingSet",
    "SystemCallFilter", "RestrictFileSystems",
}


def test_unit_has_no_option_that_hides_mounts_or_devices() -> None:
    keys = {key for _, key, _ in unit_entries(REPO / "systemd/imgmountd.service")}
    assert keys & FORBIDDEN == set()


# ---- D-Bus --------------------------------------------------------------------------------------------------

def test_activation_file_names_the_bus_and_the_unit() -> None:
    path = REPO / f"systemd/{BUS_NAME}.service"
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(path)
    assert dict(parser["D-BUS Service"]) == {"Name": BUS_NAME, "Exec": DAEMON, "User": "root",
                                             "SystemdService": "imgmountd.service"}
    assert path.name == f"{BUS_NAME}.service", "the system bus only reads an activation file named after its name"


def test_bus_policy_lets_root_own_the_name_and_everyone_call_the_api() -> None:
    config = ET.parse(REPO / f"systemd/{BUS_NAME}.conf").getroot()
    owners = [(p.attrib, a.attrib) for p in config.iter("policy") for a in p if "own" in a.attrib]
    assert owners == [({"user": "root"}, {"own": BUS_NAME})]
    (default,) = [p for p in config.iter("policy") if p.get("context") == "default"]
    assert all(rule.tag == "allow" and rule.get("send_destination") == BUS_NAME for rule in default)
    assert {rule.get("send_interface") for rule in default} == {
        f"{BUS_NAME}.Manager", f"{BUS_NAME}.Mount", "org.freedesktop.DBus.ObjectManager",
        "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer"}


@pytest.fixture(scope="module")
def bus(installed: Installed) -> Iterator[Bus]:
    """A system-like bus loading the installed policy and activation file, and a root owner of the name."""
    need("dbus-daemon", "dbus")
    share = installed.root / "usr/share/dbus-1"
    with (private_bus([share / f"system.d/{BUS_NAME}.conf"], servicedir=share / "system-services") as b,
          name_owner(b, BUS_NAME, MANAGER_PATH, [f"{BUS_NAME}.Manager", f"{BUS_NAME}.Mount", f"{BUS_NAME}.Debug"])):
        yield b


def call(bus: Bus, method: str, *args: str, user: list[str] | None = None,
         dest: str = BUS_NAME, path: str = MANAGER_PATH) -> subprocess.CompletedProcess[str]:
    return run([*(user or []), need("dbus-send", "dbus-bin"), f"--bus={bus.address}", "--print-reply",
                f"--dest={dest}", path, method, *args])


def test_dbus_daemon_loads_the_policy_and_the_activation_file(bus: Bus) -> None:
    listed = call(bus, "org.freedesktop.DBus.ListActivatableNames", dest="org.freedesktop.DBus",
                  path="/org/freedesktop/DBus")
    assert f'string "{BUS_NAME}"' in listed.stdout, listed.stderr


def test_dbus_daemon_refuses_a_broken_policy(tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text((REPO / f"systemd/{BUS_NAME}.conf").read_text().replace("</busconfig>", ""))
    with pytest.raises(BusStartError, match=re.escape(str(broken))), private_bus([broken]):
        pass


def test_only_root_may_own_the_name(bus: Bus) -> None:
    request = ("org.freedesktop.DBus.RequestName", f"string:{BUS_NAME}", "uint32:0")
    as_nobody = call(bus, *request, user=NOBODY, dest="org.freedesktop.DBus", path="/org/freedesktop/DBus")
    assert "org.freedesktop.DBus.Error.AccessDenied" in as_nobody.stderr
    as_root = call(bus, *request, dest="org.freedesktop.DBus", path="/org/freedesktop/DBus")
    assert "uint32 2" in as_root.stdout, as_root.stderr  # queued behind the owner: allowed


@pytest.mark.parametrize("method, args", [
    (f"{BUS_NAME}.Manager.Ping", ()),
    (f"{BUS_NAME}.Mount.Ping", ()),
    ("org.freedesktop.DBus.Properties.GetAll", (f"string:{BUS_NAME}.Manager",)),
    ("org.freedesktop.DBus.Introspectable.Introspect", ()),
    ("org.freedesktop.DBus.ObjectManager.GetManagedObjects", ()),
    ("org.freedesktop.DBus.Peer.Ping", ()),
])
def test_everyone_may_call_the_api(bus: Bus, method: str, args: tuple[str, ...]) -> None:
    result = call(bus, method, *args, user=NOBODY)
    assert (result.returncode, result.stderr) == (0, "")


def test_an_interface_the_policy_does_not_list_is_unreachable(bus: Bus) -> None:
    result = call(bus, f"{BUS_NAME}.Debug.Ping", user=NOBODY)
    assert "org.freedesktop.DBus.Error.AccessDenied" in result.stderr


# ---- polkit -------------------------------------------------------------------------------------------------

def test_polkitd_knows_the_actions_and_their_defaults(bus: Bus, installed: Installed) -> None:
    pkaction = need("pkaction", "polkitd")
    need("/usr/lib/polkit-1/polkitd", "polkitd")
    policy = installed.root / "usr/share/polkit-1/actions/io.github.imgmount.policy"
    declared = {a.get("id"): {d.tag: d.text for d in a.iterfind("defaults/*")}
                for a in ET.parse(policy).getroot().iter("action")}
    assert set(declared) == set(POLKIT_ACTIONS)
    with polkitd(bus, actions=[policy]):
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
        for action in POLKIT_ACTIONS:
            shown = run([pkaction, "--verbose", "--action-id", action], env=env)
            assert shown.returncode == 0, shown.stderr
            implicit = dict(re.findall(r"implicit (\w+):\s+(\S+)", shown.stdout))
            defaults = declared[action]
            assert implicit == {"any": defaults["allow_any"], "inactive": defaults["allow_inactive"],
                                "active": defaults["allow_active"]}


# ---- desktop integration ------------------------------------------------------------------------------------

def desktop_entry() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(REPO / "systemd/imgmount.desktop")
    return parser["Desktop Entry"]


def test_desktop_entry_validates(installed: Installed) -> None:
    validate = need("desktop-file-validate", "desktop-file-utils")
    result = run([validate, str(installed.root / TARGETS["systemd/imgmount.desktop"][0].lstrip("/"))])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    entry = desktop_entry()
    assert (entry["Exec"], entry["Terminal"], entry["NoDisplay"]) == ("imgmount-open %f", "false", "true")


def test_file_managers_offer_imgmount_for_each_disk_image_format(tmp_path: Path) -> None:
    gio = need("gio", "libglib2.0-bin")
    claimed = set(filter(None, desktop_entry()["MimeType"].split(";")))
    known = set(Path("/usr/share/mime/types").read_text().split())
    known |= {line.split()[0] for line in Path("/usr/share/mime/aliases").read_text().splitlines()}
    assert claimed <= known, "names shared-mime-info does not know"
    made = {"d.qcow2": "qcow2", "d.vmdk": "vmdk", "d.vdi": "vdi", "d.vhd": "vpc", "d.vhdx": "vhdx",
            "d.qed": "qed", "d.img": "raw"}
    for name, fmt in made.items():
        images.run(["qemu-img", "create", "-q", "-f", fmt, str(tmp_path / name), "1M"])
        info = run([gio, "info", "--attributes=standard::content-type", str(tmp_path / name)])
        found = re.search(r"standard::content-type: (\S+)", info.stdout)
        assert found is not None and found.group(1) in claimed, (name, info.stdout, info.stderr)


@pytest.fixture
def desktop_session(installed: Installed, tmp_path: Path) -> Path:
    """A PATH for imgmount-open: the installed commands, and xdg-open and notify-send that record their
    arguments, one line per call, in tmp_path/calls (there is no desktop session on this machine)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("xdg-open", "notify-send"):
        script = bindir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/calls\n')
        script.chmod(0o755)
    (tmp_path / "calls").touch()
    return bindir


def open_with(installed: Installed, session: Path, image: Path) -> subprocess.CompletedProcess[str]:
    opener = installed.root / TARGETS["systemd/imgmount-open"][0].lstrip("/")
    path = f"{session}:{installed.root / VENV.lstrip('/') / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
    return run([str(opener), str(image)], env={**os.environ, "PATH": path})


def test_imgmount_open_mounts_the_image_and_opens_it(installed: Installed, desktop_session: Path,
                                                   tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "greeting.txt").write_text("hello from the image\n")
    image = images.blank(tmp_path / "imgmount-open-test.img", 16 << 20)
    images.run(["mkfs.ext4", "-q", "-d", str(content), str(image)])
    umount = installed.root / VENV.lstrip("/") / "bin/imgumount"
    try:
        result = open_with(installed, desktop_session, image)
        assert result.returncode == 0, result.stderr
        calls = (tmp_path / "calls").read_text().splitlines()
        opened = [c.removeprefix("xdg-open ") for c in calls if c.startswith("xdg-open ")]
        assert len(opened) == 1
        assert (Path(opened[0]) / "greeting.txt").read_text() == "hello from the image\n"
        assert any(c.startswith("notify-send") and f"Mounted {image.name}" in c for c in calls)
        again = open_with(installed, desktop_session, image)  # already mounted: opens the same place
        assert again.returncode == 0, again.stderr
        assert (tmp_path / "calls").read_text().count(f"xdg-open {opened[0]}\n") == 2
    finally:
        run([str(umount), str(image)])


def test_imgmount_open_reports_a_failure_as_a_notification(installed: Installed, desktop_session: Path,
                                                         tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.img"
    not_an_image.write_text("just some text\n")
    result = open_with(installed, desktop_session, not_an_image)
    assert result.returncode != 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert not [c for c in calls if c.startswith("xdg-open")]
    (notice,) = [c for c in calls if c.startswith("notify-send")]
    assert "--urgency critical" in notice and f"Cannot mount {not_an_image.name}" in notice
    message = notice.split(f"Cannot mount {not_an_image.name} ", 1)[1]
    assert message.strip() and "Traceback" not in message, "names the cause in one line"
