"""Pure tests of the LVM2 metadata reader: checksums, the config parser, the VG model, synthetic PVs.

Real PVs made by the LVM tools are in tests/host/test_lvmmeta_real.py; here are the cases the tools will not
produce on demand (wrapped text, a stale second copy, crafted corruption) and property tests on mutated bytes.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgmount_testkit.lvm_synth import (
    CRAFTED_PE_START,
    PV_UUID,
    Lv,
    Mda,
    MiB,
    Pv,
    Seg,
    crafted_items,
    crafted_vg,
    crc_reference,
    metadata_text,
    nested,
    padded,
    pv_image,
    simple_image,
    simple_vg,
    vg_section,
)
from mountd.image import lvmlabel
from mountd.image.blockio import BlockReader, BytesReader
from mountd.image.lvmconfig import (
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_KEYS,
    MAX_LIST,
    MAX_LVS,
    MAX_NAME,
    MAX_PVS,
    MAX_SEGMENTS,
    MAX_STRING,
    MAX_STRIPES,
    LvmMetadataError,
    parse_config,
)
from mountd.image.lvmlabel import INITIAL_CRC, MAX_TEXT_SIZE, PhysicalVolume, format_uuid, lvm_crc, read_pv
from mountd.image.lvmmeta import LvSegment, parse_vg

# Sector 1 and the metadata area header of a PV written by pvcreate/vgcreate of LVM 2.03.16 (zeros trimmed).
REAL_LABEL = bytes.fromhex(
    "4c4142454c4f4e450100000000000000cc45a1c2200000004c564d3220303031524a4758715741736d396930546a63566b50"
    "336b337279304968436b3066394e00000004000000000000100000000000000000000000000000000000000000000000000000"
    "000000001000000000000000f00f0000000000000000000000000000000000000000000200000001").ljust(512, b"\0")
REAL_MDA_HEADER = bytes.fromhex(
    "3181ee02204c564d3220785b35412572304e2a3e01000000001000000000000000f00f000000000000120000000000002a04"
    "0000000000006e212009").ljust(512, b"\0")


class SparseReader:
    """A device of ``size`` bytes whose start is ``data`` and the rest zeros (huge claims, no huge buffers)."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self._size = data, size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        chunk = self._data[offset : offset + length]
        return chunk + bytes(length - len(chunk))


def pv_of(image: bytes | bytearray) -> PhysicalVolume:
    pv = read_pv(BytesReader(bytes(image)))
    assert pv is not None
    return pv


def check_outcome(reader: BlockReader) -> None:
    """The contract for any input: a PV, None, or LvmMetadataError; linear extents inside this device."""
    try:
        pv = read_pv(reader)
    except LvmMetadataError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    if pv is None or pv.vg is None:
        return
    for lv in pv.vg.lvs:
        extent = pv.vg.linear_extent(lv.name)
        if extent is not None and extent[0] == pv.uuid:
            assert 0 <= extent[1] and extent[1] + extent[2] <= reader.size


# --- checksums and UUIDs ------------------------------------------------------------------------------------

def test_crc_matches_what_lvm_wrote() -> None:
    assert struct.unpack_from("<I", REAL_LABEL, 16)[0] == lvm_crc(REAL_LABEL[20:])
    assert struct.unpack_from("<I", REAL_MDA_HEADER)[0] == lvm_crc(REAL_MDA_HEADER[4:])
    assert lvm_crc(b"") == INITIAL_CRC


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc_matches_lvm_definition_and_chains(a: bytes, b: bytes) -> None:
    assert lvm_crc(a) == crc_reference(a)
    assert lvm_crc(b, lvm_crc(a)) == lvm_crc(a + b)  # how LVM checksums a wrapped text in two parts


def test_uuid_is_printed_like_lvm() -> None:
    assert format_uuid("RJGXqWAsm9i0TjcVkP3k3ry0IhCk0f9N") == "RJGXqW-Asm9-i0Tj-cVkP-3k3r-y0Ih-Ck0f9N"


# --- the config parser ----------------------------------------------------------------------------------------

def test_config_syntax() -> None:
    text = b"""# comment
    vg0 {  # trailing comment
        id = "a\\"b\\\\c"   quoted = 'single "q"'
        n = -12 f = 1.5 empty = [] mixed = ["x", 1,2.5 ]
        1lv.name+x_y { seqno=3 }
    }
    version = 1\0 garbage after the NUL is ignored, as LVM does {{{
    """
    assert parse_config(text) == {
        "vg0": {"id": 'a"b\\c', "quoted": 'single "q"', "n": -12, "f": 1.5, "empty": (),
                "mixed": ("x", 1, 2.5), "1lv.name+x_y": {"seqno": 3}},
        "version": 1,
    }


@pytest.mark.parametrize(("text", "message"), [
    (b"a {", "a section is not closed"),
    (b"}", "'}' without a section"),
    (b'a = "open', "a string is not closed"),
    (b"a = 'open", "a string is not closed"),
    (b"a b", "expected '=' or '{' after 'a'"),
    (b"a = ", "expected a value"),
    (b"a = [1 2]", "expected ',' or ']' in an array"),
    (b"a = [1,]", "expected a value"),
    (b"a = [1", "expected ',' or ']' in an array"),
    (b"a = [[1]]", "expected a value"),
    (b"a = {}", "expected a value"),
    (b"a = 1.2.3", "'1.2.3' is not a number"),
    (b"a = 1 a = 2", "'a' is defined twice"),
    (b"= 1", "expected a name"),
    (b"a { b = 1 } }", "'}' without a section"),
    (b"a = [1, 2", "expected ',' or ']' in an array"),
    (b"a = 12x", "'12x' is not a number"),
    (b"a = x", "expected a value"),
    (b"a = [x]", "expected a value"),
    (b"a = ['q' 'r']", "expected ',' or ']' in an array"),
    (b'a = ["open]', "a string is not closed"),
    (b"'a' = 1", "expected a name"),
    (b"a { b } ", "expected '=' or '{' after 'b'"),
])
def test_config_errors_name_the_problem(text: bytes, message: str) -> None:
    with pytest.raises(LvmMetadataError, match="malformed at byte") as err:
        parse_config(text)
    assert message in str(err.value)


def test_config_depth_limit_is_not_a_recursion_error() -> None:
    with pytest.raises(LvmMetadataError, match=f"nests sections deeper than the {MAX_DEPTH} levels"):
        parse_config(b"a {" * 100_000)


TOKENS = [b"{", b"}", b"[", b"]", b"=", b",", b'"s\\"x"', b"'q'", b"12", b"-3", b"4.5", b"name", b"vg0",
          b"#c\n", b" ", b"\n", b'"', b"'", b"\\", b".", b"\0", b"\xff"]


@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_config_token_soup_parses_or_fails_cleanly(tokens: list[bytes]) -> None:
    with contextlib.suppress(LvmMetadataError):
        parse_config(b"".join(tokens))


@given(st.binary(max_size=400))
def test_config_arbitrary_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    with contextlib.suppress(LvmMetadataError):
        parse_config(data)


# --- the volume group model ------------------------------------------------------------------------------------

def raid_thin_vg() -> bytes:
    """A VG shaped like what LVM writes for raid1, a thin pool, a thin LV and a 2-stripe LV on two PVs."""
    pvs = [Pv("pv0", "P0P0P0-P0P0-P0P0-P0P0-P0P0-P0P0-P0P0P0", 2048, 100),
           Pv("pv1", "P1P1P1-P1P1-P1P1-P1P1-P1P1-P1P1-P1P1P1", 4096, 100)]
    hidden = ("READ", "WRITE")

    def linear(name: str, pv: str, first: int, count: int = 4) -> Lv:
        return Lv(name, format_uuid(name.ljust(32, "u")[:32]), (Seg(0, count, stripes=((pv, first),)),), hidden)

    raid_areas = {"device_count": 2, "region_size": 1024,
                  "raids": ("r1_rmeta_0", "r1_rimage_0", "r1_rmeta_1", "r1_rimage_1")}
    lvs = [
        Lv("r1", format_uuid("r1".ljust(32, "u")), (Seg(0, 4, "raid1", extra=raid_areas),)),
        linear("r1_rmeta_0", "pv0", 0, 1), linear("r1_rmeta_1", "pv1", 0, 1),
        linear("r1_rimage_0", "pv0", 1), linear("r1_rimage_1", "pv1", 1),
        Lv("pool", format_uuid("pool".ljust(32, "u")),
           (Seg(0, 8, "thin-pool", extra={"metadata": "pool_tmeta", "pool": "pool_tdata",
                                          "transaction_id": 1, "chunk_size": 128, "zero_new_blocks": 1}),),
           hidden),
        linear("pool_tdata", "pv0", 5, 8), linear("pool_tmeta", "pv1", 5, 1),
        Lv("thin", format_uuid("thin".ljust(32, "u")),
           (Seg(0, 25, "thin", extra={"thin_pool": "pool", "transaction_id": 0, "device_id": 1}),)),
        Lv("striped", format_uuid("striped".ljust(32, "u")), (Seg(0, 10, stripes=(("pv0", 20), ("pv1", 20))),)),
        Lv("split", format_uuid("split".ljust(32, "u")),
           (Seg(4, 6, stripes=(("pv1", 40),)), Seg(0, 4, stripes=(("pv0", 40),)))),
        linear("plain", "pv1", 90, 10),
    ]
    plain = lvs[-1]
    lvs[-1] = Lv(plain.name, plain.uuid, plain.segments)  # visible
    return metadata_text(vg_section("data", "DATAVG-data-data-data-data-data-datavg", 42, 2048, pvs, lvs))


def test_hidden_and_complex_lvs() -> None:
    vg = parse_vg(raid_thin_vg())
    assert (vg.name, vg.seqno, vg.extent_size) == ("data", 42, MiB)
    assert [(pv.name, pv.pe_start, pv.pe_count) for pv in vg.pvs] == [("pv0", MiB, 100), ("pv1", 2 * MiB, 100)]
    visible = {lv.name for lv in vg.lvs if lv.visible}
    assert visible == {"r1", "thin", "striped", "split", "plain"}
    r1 = vg.lv("r1")
    assert r1.segments == (LvSegment(0, 4, "raid1", ()),) and r1.size == 4 * MiB
    assert vg.lv("thin").segments[0].type == "thin" and vg.lv("thin").size == 25 * MiB
    assert vg.lv("striped").segments == (LvSegment(0, 10, "striped", (("pv0", 20), ("pv1", 20)), 128 * 512),)
    assert [s.start_extent for s in vg.lv("split").segments] == [0, 4]  # sorted by logical extent
    assert vg.lv("r1_rimage_1").uuid == format_uuid("r1_rimage_1".ljust(32, "u"))
    for name in ("r1", "thin", "pool", "striped", "split"):
        assert vg.linear_extent(name) is None, name
    assert vg.linear_extent("plain") == ("P1P1P1-P1P1-P1P1-P1P1-P1P1-P1P1-P1P1P1", 2 * MiB + 90 * MiB, 10 * MiB)
    assert vg.linear_extent("r1_rimage_0") == ("P0P0P0-P0P0-P0P0-P0P0-P0P0-P0P0-P0P0P0", MiB + MiB, 4 * MiB)


def test_unknown_lv_name_is_not_found() -> None:
    with pytest.raises(Exception, match="has no logical volume nope") as err:
        parse_vg(simple_vg()).linear_extent("nope")
    assert type(err.value).__name__ == "NotFoundError"


def _edit(old: bytes, new: bytes, text: bytes | None = None) -> bytes:
    text = simple_vg() if text is None else text
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(("text", "message"), [
    (_edit(b'contents = "Text Format Volume Group"', b'contents = "other"'), "not LVM2 text format"),
    (_edit(b"version = 1", b"version = 2"), "not LVM2 text format"),
    (metadata_text({}), "holds no volume group section"),
    (_edit(b"extent_size = 8", b"extent_size = 0"), "has an extent size of 0"),
    (_edit(b"extent_size = 8", b'extent_size = "8"'), "has no integer extent_size"),
    (_edit(b"seqno = 3", b"seqno = -3"), "seqno = -3, out of range"),
    (_edit(b"seqno = 3", b"seqno = 99999999999999999999"), "out of range"),
    (_edit(b"\tphysical_volumes {", b"\tpvs {"), "has no physical_volumes section"),
    (_edit(b"vg0 {", b"../etc {"), "not a valid name"),
    (_edit(b"\t\troot {", b"\t\t-root {"), "not a valid name"),
    (_edit(b'"pv0", 10', b'"pv9", 10'), "'pv9', neither a PV nor an LV"),
    (_edit(b'"pv0", 10', b'"pv0", 55'), "uses extents 55-64 of pv0, which has only 60"),
    (_edit(b'"pv0", 10', b'10, "pv0"'), "not a name and an extent number"),
    (_edit(b"stripe_count = 1", b"stripe_count = 2"), "inconsistent stripe_count"),
    (_edit(b"start_extent = 0", b"start_extent = 1"), "leave a gap or overlap at extent 0"),
    (_edit(b"extent_count = 10", b"extent_count = 0"), "is empty"),
    (_edit(b"segment_count = 1", b"segment_count = 2"), "segment_count that differs"),
    (_edit(b'status = ["READ", "WRITE", "VISIBLE"]', b"status = [1]"), "not a list of strings"),
    (_edit(b'type = "striped"', b"type = 3"), "has no string type"),
])
def test_vg_errors_name_the_problem(text: bytes, message: str) -> None:
    with pytest.raises(LvmMetadataError) as err:
        parse_vg(text)
    assert message in str(err.value)


NAMES = st.from_regex(r"[a-z][a-z0-9_+.-]{0,10}", fullmatch=True)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(extent_sectors=st.sampled_from([8, 2048, 8192, 16384]), seqno=st.integers(1, 2**40),
       sizes=st.dictionaries(NAMES, st.lists(st.integers(1, 50), min_size=1, max_size=4), max_size=6),
       description=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=40))
def test_vg_round_trip(extent_sectors: int, seqno: int, sizes: dict[str, list[int]], description: str) -> None:
    """LVs of random segment lists laid out one after the other on one PV parse back to the same model."""
    lvs: list[Lv] = []
    expected: dict[str, list[tuple[int, int, tuple[tuple[str, int], ...]]]] = {}
    next_pe = 0
    for name, counts in sizes.items():
        segs, start = [], 0
        for count in counts:
            segs.append(Seg(start, count, stripes=(("pv0", next_pe),)))
            start, next_pe = start + count, next_pe + count
        lvs.append(Lv(name, format_uuid(f"{len(lvs):032d}"), tuple(segs)))
        expected[name] = [(s.start, s.count, s.stripes) for s in segs]
    text = metadata_text(vg_section("vg", "u" * 38, seqno, extent_sectors, [Pv("pv0", "p" * 38, 2048, next_pe)],
                                    lvs), description)
    vg = parse_vg(text)
    assert vg.seqno == seqno and vg.extent_size == extent_sectors * 512
    assert {lv.name: [(s.start_extent, s.extent_count, s.stripes) for s in lv.segments] for lv in vg.lvs} == expected
    for lv in vg.lvs:
        assert lv.size == sum(s.extent_count for s in lv.segments) * extent_sectors * 512
        assert (vg.linear_extent(lv.name) is None) == (len(lv.segments) > 1)


# --- reading a PV ----------------------------------------------------------------------------------------------

def test_reads_a_synthetic_pv() -> None:
    pv = pv_of(simple_image())
    assert pv.uuid == PV_UUID and pv.device_size == 2 * MiB
    assert pv.vg is not None and (pv.vg.name, pv.vg.seqno) == ("vg0", 3)
    assert [lv.name for lv in pv.vg.lvs] == ["root", "home"]
    assert pv.vg.linear_extent("home") == (PV_UUID, MiB + 10 * 4096, 10 * 4096)


@pytest.mark.parametrize("data", [b"", b"LABELONE", bytes(4096), b"\xff" * 4096, bytes(MiB)])
def test_no_label_is_none(data: bytes) -> None:
    assert read_pv(BytesReader(data)) is None


@pytest.mark.parametrize("sector", [0, 1, 2, 3])
def test_label_in_any_of_the_first_four_sectors(sector: int) -> None:
    image = pv_image(2 * MiB, PV_UUID, [Mda(4096, MiB - 4096, simple_vg())], sector=sector)
    assert pv_of(image).vg is not None


def test_label_of_another_type_is_not_a_pv() -> None:
    image = simple_image()
    image[512 + 24 : 512 + 32] = b"LVM2 002"
    image[512 + 16 : 512 + 20] = struct.pack("<I", lvm_crc(bytes(image[512 + 20 : 1024])))
    assert read_pv(BytesReader(bytes(image))) is None


def test_orphan_and_ignored_areas_have_no_vg() -> None:
    assert pv_of(pv_image(2 * MiB, PV_UUID, [Mda(4096, MiB - 4096, None)])).vg is None
    assert pv_of(simple_image(flags=1)).vg is None
    assert pv_of(pv_image(2 * MiB, PV_UUID, [])).vg is None  # pvcreate --metadatacopies 0


def test_text_wrapping_around_the_circular_buffer() -> None:
    text = simple_vg()
    for tail in (1, 100, len(text) - 1):  # bytes left before the end of the area
        image = simple_image(text_offset=MiB - 4096 - tail)
        assert pv_of(image).vg == parse_vg(text)
        assert bytes(image[4096 + 512 : 4096 + 512 + len(text) - tail]) == text[tail:]


def test_newest_copy_wins_whichever_area_holds_it() -> None:
    old, new = simple_vg(3, lv_names=("a",)), simple_vg(9, lv_names=("b",))
    for first, second in ((old, new), (new, old)):
        image = pv_image(4 * MiB, PV_UUID, [Mda(4096, MiB - 4096, first), Mda(3 * MiB, MiB, second)])
        vg = pv_of(image).vg
        assert vg is not None and (vg.seqno, [lv.name for lv in vg.lvs]) == (9, ["b"])


def two_copies() -> bytearray:
    return pv_image(4 * MiB, PV_UUID, [Mda(4096, MiB - 4096, simple_vg(5)), Mda(3 * MiB, MiB, simple_vg(5))])


@pytest.mark.parametrize(("offset", "message"), [
    (4096 + 100, "has a header that fails its checksum"),
    (4096 + 512 + 30, "holds metadata text that fails its checksum"),
])
def test_damaged_copy_falls_back_to_the_other(offset: int, message: str, caplog: pytest.LogCaptureFixture) -> None:
    image = two_copies()
    image[offset] ^= 0x40
    with caplog.at_level(logging.WARNING, logger="mountd.image.lvmlabel"):
        vg = pv_of(image).vg
    assert vg is not None and vg.seqno == 5
    assert message in caplog.text
    image[3 * MiB + 512 + 30] ^= 0x40  # now both are bad: the first problem is reported
    with pytest.raises(LvmMetadataError, match=message):
        read_pv(BytesReader(bytes(image)))


def _with_header(image: bytearray, start: int, **fields: int) -> bytearray:
    """Rewrite fields of the mda header at ``start`` (keeping its checksum right)."""
    names = ["offset", "size", "checksum", "flags"]
    values = dict(zip(names, struct.unpack_from("<QQII", image, start + 40), strict=True))
    values.update({k: v for k, v in fields.items() if k in names})
    struct.pack_into("<QQII", image, start + 40, *(values[n] for n in names))
    if "hstart" in fields or "hsize" in fields:
        hstart, hsize = struct.unpack_from("<QQ", image, start + 24)
        struct.pack_into("<QQ", image, start + 24, fields.get("hstart", hstart), fields.get("hsize", hsize))
    if "version" in fields:
        struct.pack_into("<I", image, start + 20, fields["version"])
    struct.pack_into("<I", image, start, lvm_crc(bytes(image[start + 4 : start + 512])))
    return image


@pytest.mark.parametrize(("fields", "message"), [
    ({"version": 2}, "wrong magic, version or start"),
    ({"hstart": 8192}, "wrong magic, version or start"),
    ({"hsize": 512}, "claims 512 bytes"),
    ({"hsize": 4 * MiB}, "past the end of the device"),
    ({"offset": 100}, "locates its text outside the area"),
    ({"offset": MiB}, "locates its text outside the area"),
    ({"size": 0}, "locates its text outside the area"),
    ({"size": MiB}, "locates its text outside the area"),
    ({"checksum": 1}, "holds metadata text that fails its checksum"),
])
def test_bad_metadata_area_headers(fields: dict[str, int], message: str) -> None:
    image = _with_header(simple_image(), 4096, **fields)
    with pytest.raises(LvmMetadataError, match="metadata area at byte 4096") as err:
        read_pv(BytesReader(bytes(image)))
    assert message in str(err.value)


def test_huge_text_claims_are_refused_before_reading() -> None:
    image = _with_header(simple_image(), 4096, hsize=1 << 40, size=(1 << 40) - 1024)
    with pytest.raises(LvmMetadataError, match=f"bytes of metadata text, more than the {MAX_TEXT_SIZE}"):
        read_pv(SparseReader(bytes(image), 1 << 41))


@pytest.mark.parametrize(("offset", "value", "message"), [
    (512 + 16, b"\0\0\0\0", "label in sector 1 fails its checksum"),
    (512 + 8, b"\2", "label in sector 1 claims to belong in sector 2"),
])
def test_bad_labels(offset: int, value: bytes, message: str) -> None:
    image = simple_image()
    image[offset : offset + len(value)] = value
    with pytest.raises(LvmMetadataError, match=message):
        read_pv(BytesReader(bytes(image)))


@pytest.mark.parametrize(("patch", "message"), [
    ({20: struct.pack("<I", 480)}, "PV header at impossible offset 480"),
    ({32: b"-"}, "PV UUID in the LVM label contains invalid characters"),
    ({72 + 16: b"\1" * (512 - 88)}, "area lists run past the end of the label sector"),
    ({72 + 32: struct.pack("<Q", 4 * MiB)}, "metadata area at byte 4194304 lies past the end"),
])
def test_bad_pv_headers(patch: dict[int, bytes], message: str) -> None:
    image = simple_image()
    for offset, value in patch.items():
        image[512 + offset : 512 + offset + len(value)] = value
    image[512 + 16 : 512 + 20] = struct.pack("<I", lvm_crc(bytes(image[512 + 20 : 1024])))
    with pytest.raises(LvmMetadataError, match=message):
        read_pv(BytesReader(bytes(image)))


def test_pv_must_be_listed_and_fit() -> None:
    stranger = _edit(PV_UUID.encode(), b"Zz3dEf-GhIj-KlMn-OpQr-StUv-WxYz-0123ab")
    with pytest.raises(LvmMetadataError, match="does not list this PV"):
        read_pv(BytesReader(bytes(simple_image(stranger))))
    too_big = _edit(b"pe_count = 60", b"pe_count = 600")
    with pytest.raises(LvmMetadataError, match="past its end at byte 2097152"):
        read_pv(BytesReader(bytes(simple_image(too_big))))


# --- property tests on damaged images ----------------------------------------------------------------------------

BASE = bytes(simple_image())
TWO = bytes(two_copies())


@given(st.binary(max_size=4096), st.sampled_from([0, 512, 1024, 1536]), st.booleans())
def test_arbitrary_bytes(data: bytes, at: int, plant_label: bool) -> None:
    if plant_label:
        data = data[:at] + b"LABELONE" + data[at + 8 :]
    check_outcome(BytesReader(data))


# Where damage matters: label sector, the mda header, the text; in the two-copy image the second copy too.
HOT = st.one_of(st.integers(0, 2047), st.integers(4096, 4096 + 512 + len(simple_vg(5)) + 16),
                st.integers(3 * MiB, 3 * MiB + 512 + len(simple_vg(5)) + 16))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(HOT, st.integers(0, 255)), min_size=1, max_size=8), st.booleans())
def test_flipped_bytes(flips: list[tuple[int, int]], two: bool) -> None:
    image = bytearray(TWO if two else BASE)
    for offset, value in flips:
        if offset < len(image):
            image[offset] = value
    check_outcome(BytesReader(bytes(image)))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 8), st.sampled_from([*TOKENS, b"9", b"pv0"])),
                min_size=1, max_size=6), st.integers(1, 3000))
def test_edited_text_with_valid_checksums(edits: list[tuple[int, int, bytes]], tail: int) -> None:
    """Edits that the checksums do not catch (a tool bug, a crafted image) reach the parser and validator."""
    text = simple_vg()
    for where, cut, insert in edits:
        at = where % (len(text) + 1)
        text = text[:at] + insert + text[at + cut :]
    check_outcome(BytesReader(bytes(simple_image(text, text_offset=MiB - 4096 - min(tail, len(text))))))


# --- bounds: a crafted text just under each parses, just over it is one clear error -----------------------------

def escapes(size: int) -> str:
    """A string that the metadata text spells in ``size`` bytes, all escapes."""
    return "\\" * (size // 2) + "x" * (size % 2)


# case: (a VG text with a count of something, the bound on that count, what the error says past it)
BOUNDS: dict[str, tuple[Callable[[int], bytes], int, str]] = {
    "string": (lambda n: crafted_vg(description=escapes(n)), MAX_STRING,
               f"has a string of {MAX_STRING + 1} bytes, more than the {MAX_STRING} imgmount reads"),
    "name": (lambda n: crafted_vg(first_name="l" * n), MAX_NAME,
             f"has a name of {MAX_NAME + 1} bytes, more than the {MAX_NAME} imgmount reads"),
    "depth": (lambda n: crafted_vg(extra={"n": nested(n - 1)}), MAX_DEPTH,
              f"nests sections deeper than the {MAX_DEPTH} levels imgmount reads"),
    "list": (lambda n: crafted_vg(extra={"tags": ("t",) * n}), MAX_LIST,
             f"has a list of more than the {MAX_LIST} items imgmount reads"),
    "keys": (lambda n: crafted_vg(extra={"k": {f"k{i}": i for i in range(n)}}), MAX_KEYS,
             f"has more than the {MAX_KEYS} entries imgmount reads in section big/k"),
    "items": (crafted_items, MAX_ITEMS, f"has more than the {MAX_ITEMS} entries and list items imgmount reads"),
    "lvs": (lambda n: crafted_vg(lvs=n), MAX_LVS,
            f"the LVM metadata of volume group big lists more than the {MAX_LVS} logical volumes imgmount reads"),
    "pvs": (lambda n: crafted_vg(pvs=n), MAX_PVS,
            f"volume group big lists more than the {MAX_PVS} physical volumes imgmount reads"),
    "segments": (lambda n: crafted_vg(segments=n), MAX_SEGMENTS,
                 f"gives logical volume lv0 {MAX_SEGMENTS + 1} segments, more than the {MAX_SEGMENTS} imgmount"),
    "stripes": (lambda n: crafted_vg(stripes=n), MAX_STRIPES,
                f"{MAX_STRIPES + 1} stripes, more than the {MAX_STRIPES} imgmount reads"),
}


@pytest.mark.parametrize("case", BOUNDS)
def test_bound_reached_parses(case: str) -> None:
    build, bound, _ = BOUNDS[case]
    vg = parse_vg(build(bound))
    assert vg.name == "big" and vg.lv("lv1").size == (MAX_STRIPES if case == "stripes" else 1) * 4096
    if case == "lvs":
        assert len(vg.lvs) == MAX_LVS and vg.lvs[-1].name == f"thin{MAX_LVS - 6}"
    if case == "pvs":
        assert len(vg.pvs) == MAX_PVS
    if case == "segments":
        assert len(vg.lv("lv0").segments) == MAX_SEGMENTS and vg.linear_extent("lv0") is None


@pytest.mark.parametrize("case", BOUNDS)
def test_bound_crossed_is_one_clear_error(case: str) -> None:
    build, bound, message = BOUNDS[case]
    with pytest.raises(LvmMetadataError) as err:
        parse_vg(build(bound + 1))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("size", "error"), [(MAX_TEXT_SIZE, ""), (MAX_TEXT_SIZE + 1, "more than the")])
def test_text_size_bound(size: int, error: str) -> None:
    text = padded(crafted_vg(), size)
    image = pv_image(CRAFTED_PE_START + MiB, PV_UUID, [Mda(4096, CRAFTED_PE_START - 4096, text)])
    if not error:
        assert pv_of(image).vg is not None
        return
    with pytest.raises(LvmMetadataError, match=f"holds {size} bytes of metadata text, {error} {MAX_TEXT_SIZE}"):
        read_pv(BytesReader(bytes(image)))


@pytest.mark.parametrize("text", [
    b'a = "' + b"\\\\" * (4 << 20) + b'"',  # one huge string of escapes
    b"a {" * (4 << 20),  # deep nesting
    b"a = [" + b"0," * (4 << 20) + b"0]",  # one long list
    b"".join(b"k%d = 0\n" % i for i in range(1 << 20)),  # many keys in one section
    b"".join(b"s%d { a = 1 }\n" % i for i in range(MAX_KEYS + 1)),  # many sections in one
    b"".join(b"t%d {%s}\n" % (j, b"".join(b"s%d{}" % i for i in range(1000))) for j in range(600)),  # in all
])
def test_crafted_texts_stop_at_a_bound(text: bytes) -> None:
    with pytest.raises(LvmMetadataError, match="imgmount reads"):
        parse_config(text)


def test_an_image_parses_each_distinct_text_once_and_so_much_text_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VG's PVs carry the same text: parsed once. Distinct texts beyond MAX_IMAGE_TEXT in one image (a
    crafted image with a different large text on each of many partitions) are refused."""
    first, second = simple_vg(seqno=3), simple_vg(seqno=4)
    monkeypatch.setattr(lvmlabel, "MAX_IMAGE_TEXT", len(first) + len(second) - 1)
    texts = lvmlabel.MetadataTexts()
    assert texts.vg(first) is texts.vg(first) and texts.vg(first).seqno == 3
    with pytest.raises(LvmMetadataError, match="bytes of distinct text"):
        texts.vg(second)
