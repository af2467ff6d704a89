"""LVM's config language, in which LVM2 writes VG metadata (``name { key = value ... }``: lvm2's
``lib/config/config.c``), parsed with every size bounded. :mod:`mountd.image.lvmlabel` reads the labels and
the metadata areas that hold such a text; :mod:`mountd.image.lvmmeta` turns it into a volume group.
"""

from __future__ import annotations

import re
from typing import TypeAlias

from mountd.errors import InvalidImageError

# Bounds on what a metadata text may hold: each is far above what lvm writes for a real VG, and together they
# keep a crafted text from costing more than about a second of CPU and a few tens of MiB (the parser is linear
# in the text and checks each bound as the text crosses it). Going over one is an LvmMetadataError naming it.
#: Logical volumes in one VG (hidden ones included). lvm sets no limit (max_lv 0), but the text does: a linear
#: LV takes about 400 bytes, so an 8 MiB text holds about 20,000 of them.
MAX_LVS = 16384
#: Physical volumes in one VG: lvm sets no limit (max_pv 0); a VG spanning more disks than that is not inside
#: a VM disk image.
MAX_PVS = 1024
#: Segments of one LV: each is one more extension onto another free area, and one line of its dm table.
MAX_SEGMENTS = 1024
#: Areas (stripes) of one striped segment: lvm's MAX_STRIPES (lib/metadata/metadata-exported.h).
MAX_STRIPES = 128
#: Entries of one section other than a VG's volume lists: an LV section holds its segments and about ten keys.
MAX_KEYS = MAX_SEGMENTS + 64
#: Items of one list: a segment of MAX_STRIPES stripes lists 256 (name, extent); a raid segment at most 128
#: (lvm's DEFAULT_RAID_MAX_IMAGES 64 images and their metadata LVs); flag lists hold a few.
MAX_LIST = 1024
#: Bytes of one quoted string as the text spells it: lvm writes names (at most 127 bytes), UUIDs, flags, a
#: host name, a description built in a 2048-byte buffer (format-text.c) and a device path hint (PATH_MAX,
#: 4096), each with its quotes and backslashes escaped, which at most doubles it.
MAX_STRING = 2 * 4096
#: Bytes of one unquoted word (a key, a section name or a number): lvm's NAME_LEN 128 with its NUL.
MAX_NAME = 127
#: Nesting of sections: lvm writes four levels (VG, its LV list, an LV, a segment).
MAX_DEPTH = 16
#: Entries and list items of the whole text (a section counts twice), which bound the parser's work and memory
#: (about 100 bytes each): a linear or thin LV as lvm writes it takes 19, so this leaves room for tags and
#: for raid or cache LVs.
MAX_ITEMS = 32 * MAX_LVS


class LvmMetadataError(InvalidImageError):
    """An LVM label, metadata area header or metadata text is corrupt or inconsistent."""


# --- the metadata text: LVM's config syntax ------------------------------------------------------------

ConfigScalar: TypeAlias = int | float | str
ConfigSection: TypeAlias = dict[str, "ConfigValue"]
ConfigValue: TypeAlias = ConfigScalar | tuple[ConfigScalar, ...] | ConfigSection

# The grammar's pieces. Every repeat is possessive, so the regex engine keeps no backtracking state per
# character or per escape: a token of any length costs linear time and constant memory.
_BLANKS = rb"(?:[ \t\r\n\f\v]++|#[^\n]*+)*+"  # and comments
_WORD = rb"""([^ \t\r\n\f\v#={}\[\],"']++)"""  # a name or a number
_SCALAR = _WORD + rb"""|"([^"\\]*+(?:\\.[^"\\]*+)*+)"|'([^']*+)'"""  # groups: word, "string", 'string'
#: One entry of a section, whole: groups 1 key, 2-4 its scalar value, 5 "[" of a list, 6 "{" of a section;
#: or 7 "}" that closes the section; or (no group) the end of the text.
_ENTRY = re.compile(_BLANKS + rb"(?:" + _WORD + _BLANKS + rb"(?:=" + _BLANKS + rb"(?:" + _SCALAR
                    + rb"|(\[))|(\{))|(\})|\Z)", re.DOTALL)
#: One item of a list and what follows it: groups 1-3 the scalar, 4 "]" when it is the last.
_ITEM = re.compile(_BLANKS + rb"(?:" + _SCALAR + rb")" + _BLANKS + rb"(?:,|(\]))", re.DOTALL)
_EMPTY_LIST = re.compile(_BLANKS + rb"\]")
_SKIP = re.compile(_BLANKS)
#: One token, to name what is wrong where an entry or an item does not match: groups 1-3 a scalar, 4 a mark.
_TOKEN = re.compile(_BLANKS + rb"(?:" + _SCALAR + rb"|([={}\[\],])|\Z)", re.DOTALL)
_NUMBER = re.compile(rb"[+-]?[0-9.]{1,40}")
_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)
#: The sections of a VG that list its volumes: what each entry is, and their bound.
_LISTINGS = {"physical_volumes": ("physical volumes", MAX_PVS),
             "logical_volumes": ("logical volumes", MAX_LVS)}
_FEWEST_ENTRIES = min(MAX_KEYS, MAX_PVS, MAX_LVS)  # below it, no section needs a closer look


def parse_config(text: bytes) -> ConfigSection:
    """Parse LVM config text (``name { key = value ... }``) into nested dicts; LvmMetadataError if malformed.

    Values are ints, floats, strings or tuples of those. Like LVM, parsing stops at the first NUL byte.
    Duplicate keys are refused rather than guessed at. Work is linear in the text and nothing recurses; each
    bound (MAX_ITEMS, MAX_DEPTH, MAX_KEYS, MAX_LIST, MAX_STRING, MAX_NAME, and MAX_PVS and MAX_LVS for a VG's
    volume lists) is checked as the text crosses it, before anything bigger is built.
    """
    end = text.find(b"\0")
    return _ConfigParser(text, len(text) if end < 0 else end).parse()


def _scalar_start(match: re.Match[bytes], group: int) -> int:
    """Where the _SCALAR whose groups start at ``group`` begins (the groups that did not match give -1)."""
    return max(match.start(group), match.start(group + 1), match.start(group + 2))


class _ConfigParser:
    """One pass over the text, an entry or a list item per step; open sections are a list, not a recursion."""

    def __init__(self, text: bytes, end: int) -> None:
        self._text, self._end = text, end  # the text ends at ``end`` (not copied: it may be 8 MiB)
        self._items = 0  # what MAX_ITEMS counts so far
        # One str per distinct short token: keys and flags repeat in every LV ("id", "status", "READ", ...).
        self._strings: dict[bytes, str] = {}

    def parse(self) -> ConfigSection:
        sections: list[ConfigSection] = [{}]  # the top level, then each section opened inside the last
        names = [""]  # their names
        text, pos, end = self._text, 0, self._end
        while True:
            match = _ENTRY.match(text, pos, end)
            if match is None:
                raise self._diagnose(pos, in_list=False)
            pos, last = match.end(), match.lastindex
            if last is None or last == 7:  # the end of the text, or "}"
                if (last is None) != (len(sections) == 1):
                    raise self._fail("a section is not closed" if last is None else "'}' without a section",
                                     pos if last is None else match.start(7))
                if last is None:
                    return sections[0]
                sections.pop()
                names.pop()
                continue
            items, raw = sections[-1], match[1]
            self._items += 2 if last == 6 else 1  # a section counts twice: it is opened and closed
            if self._items > MAX_ITEMS or len(items) >= _FEWEST_ENTRIES or len(raw) > MAX_NAME:
                self._check_entry(match, items, names)
            key = self._strings.get(raw) or self._string(raw)
            if key in items:
                raise self._fail(f"{key[:64]!r} is defined twice", match.start(1))
            if last == 6:  # "{"
                if len(sections) > MAX_DEPTH:
                    raise self._bound(f"nests sections deeper than the {MAX_DEPTH} levels imgmount reads",
                                      match.start(6))
                child: ConfigSection = {}
                items[key] = child
                sections.append(child)
                names.append(key)
            elif last == 5:  # "["
                items[key], pos = self._list(pos)
            else:
                items[key] = self._scalar(match, 2)

    def _check_entry(self, match: re.Match[bytes], items: ConfigSection, names: list[str]) -> None:
        """Raise the error for the bound that the entry (its key is group 1 of ``match``) crosses, if any."""
        at, size = match.start(1), len(match[1])
        if self._items > MAX_ITEMS:
            raise self._too_many_items(at)
        if size > MAX_NAME:
            raise self._bound(f"has a name of {size} bytes, more than the {MAX_NAME} imgmount reads", at)
        listing = _LISTINGS.get(names[-1]) if len(names) == 3 else None  # a VG's volume list
        if listing is not None and len(items) >= listing[1]:
            raise LvmMetadataError(f"the LVM metadata of volume group {names[1][:64]} lists more than the "
                                   f"{listing[1]} {listing[0]} imgmount reads")
        if listing is None and len(items) >= MAX_KEYS:
            path = "/".join(name[:64] for name in names[1:])
            where = f"in section {path}" if path else "at its top level"
            raise self._bound(f"has more than the {MAX_KEYS} entries imgmount reads {where}", at)

    def _list(self, pos: int) -> tuple[tuple[ConfigScalar, ...], int]:
        """The list whose "[" ends at ``pos``, and where it ends."""
        empty = _EMPTY_LIST.match(self._text, pos, self._end)
        if empty is not None:
            return (), empty.end()
        items: list[ConfigScalar] = []
        while True:
            match = _ITEM.match(self._text, pos, self._end)
            if match is None:
                raise self._diagnose(pos, in_list=True)
            self._items += 1
            if len(items) >= MAX_LIST:
                raise self._bound(f"has a list of more than the {MAX_LIST} items imgmount reads",
                                  _scalar_start(match, 1))
            if self._items > MAX_ITEMS:
                raise self._too_many_items(_scalar_start(match, 1))
            items.append(self._scalar(match, 1))
            pos = match.end()
            if match.lastindex == 4:
                return tuple(items), pos

    def _scalar(self, match: re.Match[bytes], group: int) -> ConfigScalar:
        """The value of the _SCALAR that starts at ``group`` of ``match`` (one of its 3 groups matched)."""
        word, dq, sq = match.group(group, group + 1, group + 2)
        if word is not None:
            if word.isdigit() and len(word) <= 18:  # what lvm writes, fast; the rest below
                return int(word)
            return self._number(word, _scalar_start(match, group))
        raw = dq if dq is not None else sq
        if len(raw) > MAX_STRING:
            raise self._bound(f"has a string of {len(raw)} bytes, more than the {MAX_STRING} imgmount reads",
                              _scalar_start(match, group))
        if dq is not None and b"\\" in raw:
            raw = _ESCAPE.sub(rb"\1", raw)
        return self._strings.get(raw) or self._string(raw)

    def _number(self, word: bytes, at: int) -> int | float:
        if word[:1] not in b"+-.0123456789":
            raise self._fail("expected a value", at)
        try:
            if not _NUMBER.fullmatch(word):
                raise ValueError
            return float(word) if b"." in word else int(word)
        except ValueError:
            raise self._fail(f"{word[:64].decode('ascii', 'replace')!r} is not a number", at) from None

    def _string(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        if len(raw) <= 16 and len(self._strings) < 1024:  # the ones that repeat come first, in the first LV
            self._strings[raw] = text
        return text

    def _diagnose(self, pos: int, in_list: bool) -> LvmMetadataError:
        """What is wrong at ``pos``, where no entry (or list item) matches: the first token out of place.

        An entry is a name, then "=" or "{", then a value; a list item is a value, then "," or "]".
        """
        key = b""
        for step in range(3):
            token = _TOKEN.match(self._text, pos, self._end)
            if token is None:  # only an unclosed quote stops every alternative
                blanks = _SKIP.match(self._text, pos, self._end)
                assert blanks is not None  # it matches nothing, too
                return self._fail("a string is not closed", blanks.end())
            kind = token.lastindex  # 1-3 a scalar, 4 a mark, None the end of the text
            at = token.start(kind) if kind else token.end()
            if in_list and (step == 1 or kind not in (1, 2, 3)):
                return self._fail("expected ',' or ']' in an array" if step else "expected a value", at)
            if not in_list and step == 0 and kind != 1:
                return self._fail("expected a name", at)
            if not in_list and (step == 2 or (step == 1 and token[4] != b"=")):
                after = f" after {key[:64].decode('utf-8', 'replace')!r}" if step == 1 else ""
                return self._fail(f"expected '=' or '{{'{after}" if step == 1 else "expected a value", at)
            key, pos = token[1] or b"", token.end()
        raise AssertionError("unreachable: a three-token entry or a two-token item matches")

    def _fail(self, what: str, at: int) -> LvmMetadataError:
        return LvmMetadataError(f"the LVM metadata text is malformed at byte {at}: {what}")

    def _bound(self, what: str, at: int) -> LvmMetadataError:
        return LvmMetadataError(f"the LVM metadata text {what} (at byte {at})")

    def _too_many_items(self, at: int) -> LvmMetadataError:
        return self._bound(f"has more than the {MAX_ITEMS} entries and list items imgmount reads", at)
