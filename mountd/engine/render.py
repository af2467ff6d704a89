"""Inspection results as a readable tree (like ``lsblk`` under ``qemu-img info``) and as JSON.

The JSON schema is documented in README.md ("imgmount --info --json"); keys are stable, additions only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mountd.engine.inspection import InspectedDisk, Inspection, Volume, VolumeKind
from mountd.engine.unlocking import image_lock_kind, lock_kind
from mountd.host.holders import FileUsage
from mountd.host.support import HostSupport
from mountd.image.imageinfo import ImageFile
from mountd.image.partitions import PartitionTable
from mountd.image.recovery import describe

GPT_TYPES = {
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery",
}
MBR_TYPES = {
    "83": "Linux", "8e": "Linux LVM", "82": "Linux swap", "fd": "Linux RAID", "5": "Extended",
    "f": "W95 Extended (LBA)", "85": "Linux extended", "7": "HPFS/NTFS/exFAT", "b": "W95 FAT32",
    "c": "W95 FAT32 (LBA)", "e": "W95 FAT16 (LBA)", "ef": "EFI (FAT-12/16/32)", "ee": "GPT",
}
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: int) -> str:
    value, unit = float(n), 0
    while value >= 1024 and unit < len(UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.0f} {UNITS[unit]}" if value == int(value) else f"{value:.1f} {UNITS[unit]}"


def type_name(table_label: str, type_id: str) -> str:
    names = GPT_TYPES if table_label == "gpt" else MBR_TYPES
    return names.get(type_id.upper() if table_label == "gpt" else type_id.lower(), type_id)


# --- JSON -----------------------------------------------------------------------------------------------


def inspection_to_dict(ins: Inspection) -> dict[str, Any]:
    usage = {u.path: u for u in ins.usage}
    return {
        "image": ins.image.top.path,
        "format": ins.image.format,
        "virtual-size": ins.image.virtual_size,
        "locked": image_lock_kind(ins.image) or None,  # "QEMU luks", "QEMU aes": QEMU encrypted the image
        "chain": [_file_dict(f, usage) for f in ins.image.chain],
        "in-use": _worst(ins.usage),
        "partition-table": _table_dict(ins.table),
        "disks": [_disk_dict(d) for d in ins.disks],
        "volume-groups": [
            {"name": vg.name, "uuid": vg.uuid, "seqno": vg.seqno, "extent-size": vg.extent_size,
             "physical-volumes": [pv.uuid for pv in vg.pvs],
             "logical-volumes": [lv.name for lv in vg.lvs if lv.visible]}
            for vg in ins.volume_groups
        ],
        "volumes": [_volume_dict(v) for v in _noted(ins)],
        "host": None if ins.host is None else _host_dict(ins.host),
    }


def _table_dict(table: PartitionTable | None) -> dict[str, Any] | None:
    return None if table is None else {
        "label": table.label,
        "sector-size": table.sector_size,
        "disk-id": table.disk_id,
        "warnings": list(table.warnings),
        "partitions": [
            {"number": p.number, "start": p.start, "size": p.size, "type": p.type,
             "type-name": type_name(table.label, p.type), "uuid": p.uuid, "name": p.name,
             "bootable": p.bootable, "container": p.container}
            for p in table.partitions
        ],
    }


def _disk_dict(d: InspectedDisk) -> dict[str, Any]:
    """One disk of an OVA: where its bytes are in the archive, and its own partition table."""
    member = d.image.top.member
    return {"name": d.name, "label": d.label, "file": member.name if member else None,
            "offset": member.offset if member else None, "size": member.size if member else None,
            "format": d.image.format, "virtual-size": d.image.virtual_size,
            "partition-table": _table_dict(d.layout.table)}


def _host_dict(host: HostSupport) -> dict[str, Any]:
    return {"backends": host.backends(), "nbd": host.nbd, "device-mapper": host.device_mapper,
            "fuse": host.fuse, "missing-programs": [p.name for p in host.missing]}


def _file_dict(f: ImageFile, usage: dict[str, FileUsage]) -> dict[str, Any]:
    return {
        "path": f.path, "format": f.format, "virtual-size": f.virtual_size, "actual-size": f.actual_size,
        "backing": f.backing, "data-file": f.data_file, "extents": list(f.extents),
        "snapshots": [{"id": s.id, "name": s.name} for s in f.snapshots],
        "usage": _usage_dict(usage.get(f.path)),
    }


def _usage_dict(u: FileUsage | None) -> dict[str, Any]:
    if u is None:
        return {"state": "free", "holders": []}
    return {"state": u.state, "description": u.describe(),
            "holders": [{"pid": h.pid, "program": h.program, "writable": h.writable} for h in u.holders]}


def _worst(usages: tuple[FileUsage, ...]) -> str:
    states = {u.state for u in usages}
    return next((s for s in ("read-write", "read-only") if s in states), "free")


def _volume_dict(v: Volume) -> dict[str, Any]:
    sig = v.signature
    return {
        "name": v.name, "kind": v.kind, "offset": v.offset, "size": v.size, "vg": v.vg or None,
        "filesystem": None if sig is None else {"type": sig.type, "usage": sig.usage, "label": sig.label,
                                                "uuid": sig.uuid},
        "note": v.note or None,
        "locked": lock_kind(v) or None,  # "LUKS1", "LUKS2", "BitLocker": what it takes a key to open
        "needs-recovery": bool(sig and sig.needs_recovery),
    }


# --- tree -----------------------------------------------------------------------------------------------


def render_tree(ins: Inspection) -> str:
    usage = {u.path: u for u in ins.usage}
    lines = [_file_line(f, usage, i) for i, f in enumerate(ins.image.chain)]
    if ins.image.encryption:
        hint = "" if ins.volumes else "; what it holds shows with its passphrase (--passphrase-stdin)"
        lines.append(f"locked: encrypted by QEMU ({ins.image.encryption}){hint}")
    lines += _table_lines(ins.table, "")
    for d in ins.disks:
        lines.append(_disk_line(d))
        lines += _table_lines(d.layout.table, "    ")
    rows: list[tuple[str, ...]] = [("NAME", "OFFSET", "SIZE", "TYPE", "FSTYPE", "LABEL", "UUID / NOTE")]
    rows += _volume_rows(ins)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines += ["  ".join([*(c.ljust(w) if i in (0, 3, 4, 5) else c.rjust(w)
                          for i, (c, w) in enumerate(zip(r, widths, strict=False))), r[-1]]).rstrip()
              for r in rows]
    if ins.host is not None:
        lines.append(ins.host.summary())
    return "\n".join(lines)


def _table_lines(t: PartitionTable | None, indent: str) -> list[str]:
    if t is None:
        return []
    return [f"{indent}{t.label.upper() if t.label == 'gpt' else 'MBR (dos)'} partition table, "
            f"{t.sector_size}-byte sectors, disk id {t.disk_id}",
            *(f"{indent}  warning: {w}" for w in t.warnings)]


def _disk_line(d: InspectedDisk) -> str:
    member = d.image.top.member
    where = f", file {member.name} ({human_size(member.size)}) in the archive" if member else ""
    return f"  {d.name} ({d.label}{where}): {d.image.format}, {human_size(d.image.virtual_size)} virtual"


def _file_line(f: ImageFile, usage: dict[str, FileUsage], depth: int) -> str:
    u = usage.get(f.path)
    head = f.path if depth == 0 else "  " * depth + f"backing file {f.path}"
    extra = f", external data file {f.data_file}" if f.data_file else ""
    snaps = f", {len(f.snapshots)} internal snapshot(s)" if f.snapshots else ""
    return (f"{head}: {f.format}, {human_size(f.virtual_size)} virtual, {human_size(f.actual_size)} on disk"
            f"{extra}{snaps}; {u.describe() if u else 'free'}")


def _noted(ins: Inspection) -> tuple[Volume, ...]:
    """The volumes; an LV that is no one piece of the disk (striped, thin) also says what mapping it takes on
    the host that inspected it."""
    mapped = ins.host is not None and ins.host.lv_mapping
    tail = "mapped through device-mapper when mounted" if mapped else "needs device-mapper"
    md = ins.host is not None and ins.host.md_assembly
    return tuple(replace(v, note=f"{v.note}: {tail}") if _mapped_only(v) else
                 replace(v, note=v.note.replace(v.array.obstacle(), v.array.obstacle(md=True)))
                 if md and v.array and _assembled_only(v) else v
                 for v in ins.volumes)


def _assembled_only(v: Volume) -> bool:
    """An md array no member holds whole, and none missing: md assembles it."""
    return v.kind == VolumeKind.MD and v.offset is None and v.array is not None and not v.array.missing()


def _mapped_only(v: Volume) -> bool:
    return v.kind == VolumeKind.LV and bool(v.unmapped) and v.note == v.unmapped


def _volume_rows(ins: Inspection) -> list[tuple[str, ...]]:
    volumes = _noted(ins)
    top = [v for v in volumes if v.kind != VolumeKind.LV]
    lvs = [v for v in volumes if v.kind == VolumeKind.LV]
    rows: list[tuple[str, ...]] = []
    for i, v in enumerate(top):
        last = i == len(top) - 1 or _disk_of(ins, top[i + 1]) != _disk_of(ins, v)  # of its disk, in an OVA
        prefix = "" if v.kind == VolumeKind.DISK else ("└─" if last else "├─")
        rows.append(_row(prefix + v.name, v, _part_type(ins, v)))
        children = [lv for lv in lvs if v.pv and lv.vg == v.vg and _disk_of(ins, lv) == _disk_of(ins, v)
                    and _belongs(lv, v, top)]
        for j, lv in enumerate(children):
            indent = "" if v.kind == VolumeKind.DISK else ("  " if last else "│ ")
            rows.append(_row(indent + ("└─" if j == len(children) - 1 else "├─") + lv.name, lv, "LVM LV"))
    return rows


def _belongs(lv: Volume, region: Volume, regions: list[Volume]) -> bool:
    """An LV is shown under the PV holding its extent, or under its VG's first PV when not linear."""
    if lv.offset is not None and region.offset is not None:
        return region.offset <= lv.offset < region.offset + region.size
    first = next((r for r in regions if r.vg == lv.vg), None)
    return first is region


def _disk_of(ins: Inspection, v: Volume) -> InspectedDisk | None:
    """The disk of an OVA that holds ``v`` (None for an image of one disk)."""
    return next((d for d in ins.disks if v.name == d.name or v.name.startswith(f"{d.name}/")), None)


def _part_type(ins: Inspection, v: Volume) -> str:
    if v.array is not None:
        return f"{v.array.first.level_name} array"
    disk = _disk_of(ins, v)
    table = disk.layout.table if disk else ins.table
    if v.partition is None or table is None:
        return "disk"
    return type_name(table.label, v.partition.type)


def _row(name: str, v: Volume, kind: str) -> tuple[str, ...]:
    sig = v.signature
    offset = "-" if v.offset is None else human_size(v.offset)
    pending = describe(sig.type, sig.recovery) if sig else ""
    locked = f"(locked: {lock_kind(v)})" if lock_kind(v) else ""
    detail = " ".join(x for x in (sig.uuid if sig else "", f"({v.note})" if v.note else "",
                                  f"({pending})" if pending else "", locked) if x)
    return (name, offset, human_size(v.size), kind, sig.type if sig else "", sig.label if sig else "", detail)
