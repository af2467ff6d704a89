"""``imgmount --info`` on image files whose LVM metadata is crafted to lie at, or just past, a bound of
the LVM readers: at the bound it shows the whole VG; past it, one line names the bound.

The images are sparse files of one PV (imgmount_testkit/lvm_synth.py writes them byte for byte); the command runs
as a user runs it, in-process as root.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from imgmount_testkit.lvm_synth import CRAFTED_PE_START, crafted_items, crafted_vg, nested, padded, pv_file
from mountd.engine.inspection import MAX_PROBED
from mountd.errors import InvalidImageError
from mountd.image.lvmconfig import MAX_DEPTH, MAX_ITEMS, MAX_LIST, MAX_LVS, MAX_STRING
from mountd.image.lvmlabel import MAX_TEXT_SIZE


def imgmount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "imgmount"), *args], capture_output=True,
                          text=True, check=False)


@pytest.fixture(scope="module")
def most_lvs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pv_file(tmp_path_factory.mktemp("lvs") / "most-lvs.img", crafted_vg(lvs=MAX_LVS))


def test_a_vg_of_the_most_lvs_is_shown_whole(most_lvs: Path) -> None:
    proc = imgmount("--info", "--json", str(most_lvs))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    thin = [f"thin{i}" for i in range(MAX_LVS - 5)]
    (vg,) = data["volume-groups"]
    assert vg["name"] == "big" and vg["logical-volumes"] == ["lv0", "lv1", "pool", *thin]  # 2 hidden
    volumes = {v["name"]: v for v in data["volumes"]}
    assert len(volumes) == 1 + MAX_LVS - 2
    assert (volumes["big/lv0"]["offset"], volumes["big/lv0"]["size"]) == (CRAFTED_PE_START, 4096)
    assert volumes[f"big/thin{MAX_LVS - 6}"]["note"].endswith("needs device-mapper")


def test_past_512_volumes_the_rest_are_listed_unprobed(tmp_path: Path) -> None:
    """A VG of 600 linear LVs (one extent each): the first 512 volumes (the PV, then LVs) are probed with
    blkid, the rest are listed with a note saying why they were not."""
    image = pv_file(tmp_path / "linear.img", crafted_vg(lvs=600, thin=False))
    proc = imgmount("--info", "--json", str(image))
    assert proc.returncode == 0, proc.stderr
    volumes = json.loads(proc.stdout)["volumes"]
    assert len(volumes) == 601
    unprobed = [v for v in volumes if (v["note"] or "").startswith("not probed")]
    assert len(unprobed) == 601 - MAX_PROBED and unprobed[0]["name"] == volumes[MAX_PROBED]["name"]
    assert "at most 512 volumes" in unprobed[0]["note"] and unprobed[0]["offset"] is not None


def test_the_tree_lists_every_lv(most_lvs: Path) -> None:
    proc = imgmount("--info", str(most_lvs))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith(("├─big/", "└─big/")) and " LVM LV" in line for line in lines) == MAX_LVS - 2
    assert lines[-2].startswith(f"└─big/thin{MAX_LVS - 6} ")
    assert lines[-1].startswith("this host: backends ")


#: Crafted metadata texts just past a bound of the LVM readers, and the words of the error naming it.
PAST_A_BOUND: list[tuple[Callable[[], bytes], str]] = [
    (lambda: crafted_vg(lvs=MAX_LVS + 1),
     f"the LVM metadata of volume group big lists more than the {MAX_LVS} logical volumes imgmount reads"),
    (lambda: crafted_vg(description="\\" * (2 << 20)),
     f"the LVM metadata text has a string of {4 << 20} bytes, more than the {MAX_STRING} imgmount reads"),
    (lambda: crafted_vg(extra={"n": nested(MAX_DEPTH)}),
     f"the LVM metadata text nests sections deeper than the {MAX_DEPTH} levels imgmount reads"),
    (lambda: crafted_vg(extra={"tags": ("t",) * (1 << 20)}),
     f"the LVM metadata text has a list of more than the {MAX_LIST} items imgmount reads"),
    (lambda: padded(crafted_vg(), MAX_TEXT_SIZE + 1),
     f"holds {MAX_TEXT_SIZE + 1} bytes of metadata text, more than the {MAX_TEXT_SIZE} imgmount reads"),
    (lambda: crafted_items(MAX_ITEMS + 1),
     f"the LVM metadata text has more than the {MAX_ITEMS} entries and list items imgmount reads"),
]
PAST_A_BOUND_IDS = ["lvs", "string", "depth", "list", "text", "entries"]


@pytest.mark.parametrize(("text", "error"), PAST_A_BOUND, ids=PAST_A_BOUND_IDS)
def test_crafted_metadata_past_a_bound_is_one_clear_error(tmp_path: Path, text: Callable[[], bytes],
                                                          error: str) -> None:
    image = pv_file(tmp_path / "crafted.img", text())
    proc = imgmount("--info", str(image))
    assert proc.returncode == InvalidImageError.exit_code
    assert proc.stderr.startswith("imgmount: ") and proc.stderr.count("\n") == 1
    assert error in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("text", [lambda: padded(crafted_vg(), MAX_TEXT_SIZE), lambda: crafted_items(MAX_ITEMS)],
                         ids=["text", "entries"])
def test_crafted_metadata_at_a_bound_is_read(tmp_path: Path, text: Callable[[], bytes]) -> None:
    image = pv_file(tmp_path / "crafted.img", text())
    proc = imgmount("--info", "--json", str(image))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["volume-groups"][0]["logical-volumes"] == ["lv0", "lv1"]
