"""Thin pools and thin LVs read from VG metadata (mountd.image.lvmthin), and the dm tables built from them
(mountd.engine.lvmapping): what LVM writes maps; anything else is one sentence naming the LV and the cause."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from imgmount_testkit.lvm_synth import Lv, Pv, Seg, crafted_vg, metadata_text, vg_section
from mountd.engine.lvmapping import pool_features, pool_table, thin_table
from mountd.errors import InvalidImageError, UnsupportedError
from mountd.image.lvmlabel import format_uuid
from mountd.image.lvmmeta import VolumeGroup, parse_vg
from mountd.image.lvmthin import ThinPool, is_thin, is_thin_pool, thin_pool, thin_volume

POOL = {"metadata": "pool00_tmeta", "pool": "pool00_tdata", "transaction_id": 2, "chunk_size": 128,
        "discards": "passdown", "zero_new_blocks": 1}
THIN = {"thin_pool": "pool00", "transaction_id": 0, "device_id": 1}


def vg(pool: Mapping[str, Any] = POOL, thin: Mapping[str, Any] = THIN, tmeta: Seg | None = None) -> VolumeGroup:
    """A VG as lvm writes the Fedora layout: pool00 (16 extents) over pool00_tdata, pool00_tmeta; thin root."""
    hidden = ("READ", "WRITE")
    lvs = [Lv("pool00", format_uuid("P" * 32), (Seg(0, 16, "thin-pool", extra=pool),)),
           Lv("root", format_uuid("R" * 32), (Seg(0, 64, "thin", extra=thin),)),
           Lv("pool00_tdata", format_uuid("D" * 32), (Seg(0, 16, stripes=(("pv0", 1),)),), hidden),
           Lv("pool00_tmeta", format_uuid("M" * 32), (tmeta or Seg(0, 1, stripes=(("pv0", 0),)),), hidden)]
    pvs = [Pv("pv0", "P0P0P0-P0P0-P0P0-P0P0-P0P0-P0P0-P0P0P0", 2048, 100)]
    return parse_vg(metadata_text(vg_section("fedora", "V" * 6 + "-VVVV" * 5 + "-" + "V" * 6, 3, 8192, pvs, lvs)))


def test_the_fedora_layout() -> None:
    group = vg()
    assert is_thin(group.lv("root")) and is_thin_pool(group.lv("pool00")) and not is_thin(group.lv("pool00"))
    thin = thin_volume(group, "root")
    assert (thin.name, thin.device_id, thin.size) == ("root", 1, 64 * 4 * 2**20)
    assert thin.pool == ThinPool("pool00", "pool00_tmeta", "pool00_tdata", 128, True, "passdown", 16 * 4 * 2**20)


def test_crafted_vgs_of_many_thin_lvs_read_alike() -> None:
    group = parse_vg(crafted_vg(lvs=8))
    assert [thin_volume(group, f"thin{i}").device_id for i in range(3)] == [1, 2, 3]


def test_tables() -> None:
    pool = thin_pool(vg(), "pool00")
    assert pool_table(pool, "/dev/mapper/m", "/dev/mapper/d", read_only=True) == [
        [0, 16 * 8192, "thin-pool", "/dev/mapper/m", "/dev/mapper/d", 128, 0, 3,
         "skip_block_zeroing", "ignore_discard", "read_only"]]
    assert thin_table(64 * 4 * 2**20, "/dev/mapper/p", 7) == [[0, 64 * 8192, "thin", "/dev/mapper/p", 7]]


@pytest.mark.parametrize(("settings", "features"), [
    ({}, ["error_if_no_space"]),
    ({"zero_new_blocks": 0, "discards": "ignore"}, ["skip_block_zeroing", "ignore_discard", "error_if_no_space"]),
    ({"discards": "nopassdown"}, ["no_discard_passdown", "error_if_no_space"]),
])
def test_a_read_write_pool_keeps_its_own_settings(settings: dict[str, Any], features: list[str]) -> None:
    assert pool_features(thin_pool(vg({**POOL, **settings}), "pool00"), read_only=False) == features


@pytest.mark.parametrize(("pool", "thin", "message"), [
    (POOL, {**THIN, "device_id": 1 << 24}, "thin volume fedora/root has no device_id from 0 to 16777215"),
    (POOL, {"transaction_id": 0, "device_id": 1}, "thin volume fedora/root names no thin pool"),
    (POOL, {**THIN, "thin_pool": "root"}, "thin pool fedora/root is not one thin-pool segment"),
    (POOL, {**THIN, "thin_pool": "nope"}, "uses 'nope', which is not a logical volume"),
    ({**POOL, "metadata": "pool00"}, THIN, "thin pool fedora/pool00 names no metadata volume of its own"),
    ({**POOL, "pool": 5}, THIN, "thin pool fedora/pool00 names no data volume of its own"),
    ({**POOL, "chunk_size": 64}, THIN, "has no chunk_size from 128 to 2097152"),
    ({**POOL, "chunk_size": 200}, THIN, "chunk size of 200 sectors, not a multiple of 128"),
    ({**POOL, "discards": "sometimes"}, THIN, "has discards = 'sometimes', not one of passdown"),
])
def test_metadata_lvm_never_writes_is_refused(pool: dict[str, Any], thin: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        thin_volume(vg(pool, thin), "root")


def test_what_imgmount_does_not_map_says_so() -> None:
    with pytest.raises(UnsupportedError, match="snapshot of an external origin"):
        thin_volume(vg(thin={**THIN, "external_origin": "base"}), "root")
    raid_meta = Seg(0, 1, "raid1", extra={"device_count": 2, "raids": ("a", "b", "c", "d")})
    with pytest.raises(UnsupportedError, match="keeps its metadata on pool00_tmeta, a raid1 volume: imgmount "
                                               "maps thin pools on linear and striped volumes only"):
        thin_volume(vg(tmeta=raid_meta), "root")
