"""The shape of the library: imports run one way, top floor to bottom.

Each module of ``hmt`` stands on a floor and imports only modules on lower floors (a package's
modules may import each other); every import of an hmt module sits at the top of its module
(none inside a function, as one would to dodge a cycle); no module, and no benchmark, uses a
name another module keeps private. A change that breaks this fails here, naming the import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "hmt"

# Bottom to top. A module may import any module on a lower floor.
FLOORS = [
    ["constants", "utils", "compat", "config", "arguments"],  # no hmt imports (but the ones beside them)
    ["fetch"],
    ["backbone"],
    ["layout", "kv_cache", "fingerprint", "data"],
    ["inputs", "scoring", "memory"],
    ["baselines", "checkpoint", "generation"],
    ["model"],
    ["visualize"],
    ["evaluate"],
    ["training"],
    ["train", "recall", "passkey", "lm_eval_model"],  # train: the trainer's names as they were (hmt.train.*)
    ["cli"],
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
# Inside a package, its modules bottom to top (one a floor).
PACKAGE_FLOORS = {"training": ["config", "build", "optim", "objective", "evaluation", "distributed", "lowp", "state", "loop",
                               "recipe"]}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def _name(path: Path) -> str:
    """``hmt.data.corpus`` -> ``data``: the top-level module or package of ``path``."""
    return path.relative_to(SRC).with_suffix("").parts[0]


def _imported(path: Path, node: ast.ImportFrom, depth: int = 0) -> list[str]:
    """The hmt modules an ``from ... import`` names (relative or absolute): at the top level
    (``depth`` 0), or inside the package, one level down (``depth`` 1)."""
    package = path.relative_to(SRC).parent.parts  # () for hmt itself
    if node.level:
        base = list(package[: len(package) - (node.level - 1)]) if node.level > 1 else list(package)
        parts = base + (node.module.split(".") if node.module else [])
    elif node.module and node.module.split(".")[0] == "hmt":
        parts = node.module.split(".")[1:]
    else:
        return []
    if len(parts) > depth:
        return [parts[depth]]
    return [alias.name for alias in node.names] if len(parts) == depth else []  # from . import backbone, checkpoint


def _hmt_imports(path: Path):
    """``(line, module imported, at the top of the module)`` of every hmt import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for name in _imported(path, node):
                yield node.lineno, name, id(node) in top, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hmt" and "." in alias.name:
                    yield node.lineno, alias.name.split(".")[1], id(node) in top, []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_downward_and_sit_at_the_top(path):
    me = _name(path)
    assert me in FLOOR, f"{me} has no floor in tests/test_layers.py: give it one"
    for line, other, at_top, _ in _hmt_imports(path):
        where = f"{path.relative_to(ROOT)}:{line} imports hmt.{other}"
        assert other in FLOOR, f"{where}, which has no floor"
        assert at_top, f"{where} inside a function: import it at the top (if that makes a cycle, a name is on the wrong floor)"
        if other != me:
            assert FLOOR[other] < FLOOR[me], f"{where}, which stands on a higher floor ({FLOOR[other]} > {FLOOR[me]})"


@pytest.mark.parametrize("package", sorted(PACKAGE_FLOORS))
def test_a_packages_modules_import_downward_too(package):
    order = PACKAGE_FLOORS[package]
    for path in sorted((SRC / package).glob("*.py")):
        if path.name == "__init__.py":
            continue
        me = path.stem
        assert me in order, f"{package}.{me} has no floor in PACKAGE_FLOORS"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for other in _imported(path, node, depth=1):
                    where = f"{path.relative_to(ROOT)}:{node.lineno} imports {package}.{other}"
                    assert order.index(other) < order.index(me), f"{where}, which stands higher"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_uses_another_ones_private_names(path):
    for line, other, _, names in _hmt_imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(ROOT)}:{line} imports {private} from hmt.{other}: make it public or keep it there"


def test_benchmarks_use_public_names_only():
    used = re.compile(r"\b(?:hmt|bb|kv|kv_cache|ev|generation|checkpoint|recall|data|hdata|train|model)\.(_[a-z]\w*)")
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for number, text in enumerate(path.read_text().splitlines(), 1):
            found = [name for name in used.findall(text) if not name.startswith("__")]
            assert not found, f"{path.relative_to(ROOT)}:{number} uses {found}: give hmt a public way to do it"
