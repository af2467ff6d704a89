"""The package's floors (README, "Layout"; issue 11): each module imports only from the floors below its own.

    mountd (errors, settings, the API's names and model)
    < mountd.host (facts about this machine and actions on them)
    < mountd.image (what an image holds: formats, partitions, LVM, filesystems)
    < mountd.layers (one module a layer kind)
    < mountd.engine (journal, stack, backends, volumes, the engine)
    < mountd.service (imgmountd) | mountd.cli (the commands)

Within a floor modules may import each other, except layer kinds: each imports only the template
(``mountd.layers.layer``), so no layer kind reaches into another. Imports under ``if TYPE_CHECKING:`` count
too: a type is a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mountd"
RANK = {"": 0, "host": 1, "image": 2, "layers": 3, "engine": 4, "service": 5, "cli": 5}
LAYER_TEMPLATE = "mountd.layers.layer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> str:
    """``mountd.host.holders`` -> "host"; a top-level module (``mountd.errors``) -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else ""


def imported(module: str, source: str, *, is_package: bool = False) -> set[str]:
    """Every ``mountd`` module that ``module`` (its ``source``) imports, relative imports resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mountd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            if base.split(".")[0] == "mountd":  # "from mountd.host import holders": the module mountd.host.holders
                found |= {f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names}
    return found


def is_module(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/")).with_suffix(".py").exists()


def violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    mine = floor(module)
    bad = []
    for other in sorted(imported(module, source, is_package=is_package) - {"mountd", module}):
        theirs = floor(other)
        if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != mine):
            bad.append(f"{module} ({mine or 'mountd'}) imports {other} ({theirs or 'mountd'}) from above or beside")
        elif mine == theirs == "layers" and LAYER_TEMPLATE not in (other, module):
            bad.append(f"{module} imports another layer kind, {other}")
    return bad


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_on_a_floor() -> None:
    assert MODULES
    unknown = [str(p) for p in MODULES if len(p.relative_to(PACKAGE).parts) > 1
               and p.relative_to(PACKAGE).parts[0] not in RANK]
    assert not unknown, f"modules outside the floors: {unknown}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_only_from_the_floors_below(path: Path) -> None:
    assert not violations(module_name(path), path.read_text(), is_package=path.name == "__init__.py")


def test_the_checker_sees_an_upward_and_a_sideways_import() -> None:
    source = "from mountd.engine.journal import Journal\nfrom . import loop\nfrom .layer import Layer\n"
    assert violations("mountd.layers.probe", source) == [
        "mountd.layers.probe (layers) imports mountd.engine.journal (engine) from above or beside",
        "mountd.layers.probe imports another layer kind, mountd.layers.loop"]
    assert violations("mountd.cli.main", "from mountd.service.daemon import main\n") == [
        "mountd.cli.main (cli) imports mountd.service.daemon (service) from above or beside"]
    assert violations("mountd.engine.stack", "from ..host import processes\nimport mountd.errors\n") == []


def test_the_readme_names_every_module() -> None:
    """The README's layout lists each module with what it does: a new one is added there too."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Tests")]
    missing = [str(p.relative_to(PACKAGE.parent)) for p in MODULES if p.name != "__init__.py"
               and f"| `{p.relative_to(PACKAGE.parent)}` |" not in layout]
    assert not missing, f"modules missing from the README's layout table: {missing}"
