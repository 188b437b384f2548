"""Imports point down: every import in longctx/ (module-level or inside a function) goes to the
importing module's own package or to a lower level of the layout below, never up or sideways.

    8  longctx/__init__.py        (the package entry: registers the attention implementations)
    7  __main__
    6  cli
    5  commands
    4  train, lora, eval          (no imports between these three)
    3  models, parallel           (I/O, sequence parallelism)
    2  rope, attention, tasks     (pure math and builders)
    1  units, labels, version
    0  errors

A new module or package of longctx/ fails here until it has a level.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "longctx"

LEVELS = {
    "errors": 0,
    "version": 1,
    "units": 1,
    "labels": 1,
    "rope": 2,
    "attention": 2,
    "tasks": 2,
    "models": 3,
    "parallel": 3,
    "train": 4,
    "lora": 4,
    "eval": 4,
    "commands": 5,
    "cli": 6,
    "__main__": 7,
    "longctx": 8,  # the package's own __init__: registers longctx's attention implementations with transformers
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(name: str) -> str:
    """The layout unit of a longctx module name: 'longctx.rope.config' -> 'rope', 'longctx' -> 'longctx'."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "longctx"


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every longctx module the file imports, at any depth of the code:
    `import a.b`, `from a import b` (b itself when it is a module), relative imports, and
    importlib.import_module("...") with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if is_module(candidate) else base))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "longctx" or name.startswith("longctx.")]


def violations(path: Path) -> list[str]:
    source = component(module_name(path))
    problems = []
    for line, target in imported_modules(path):
        unit = component(target)
        if unit == source:
            continue
        if unit not in LEVELS:
            problems.append(f"line {line}: imports {target}, whose package {unit!r} has no level in test_layout.py")
        elif LEVELS[unit] >= LEVELS[source]:
            way = "sideways" if LEVELS[unit] == LEVELS[source] else "up"
            problems.append(f"line {line}: imports {target} ({unit}, level {LEVELS[unit]}) {way} from {source} (level {LEVELS[source]})")
    return problems


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_level():
    units = {component(module_name(path)) for path in MODULES}
    assert units - set(LEVELS) == set(), "give each new package of longctx/ a level in LEVELS"
    assert set(LEVELS) - units == set(), "LEVELS names a package that no longer exists"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE.parent)))
def test_imports_point_down(path):
    problems = violations(path)
    assert not problems, "\n".join(problems)


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    """The negative control: an upward import inside a function, a sideways relative one and a
    literal importlib name are all reported (on a copy of the rope package written to tmp_path)."""
    package = tmp_path / "longctx"
    (package / "rope").mkdir(parents=True)
    (package / "eval").mkdir()
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "eval" / "__init__.py").write_text("")
    (package / "rope" / "__init__.py").write_text("")
    (package / "rope" / "bad.py").write_text(
        "import importlib\n"
        "from longctx.errors import LongctxError\n"
        "from . import config\n"
        "def late():\n"
        "    from longctx.eval import runner\n"
        "    from ..tasks import prompts\n"
        "    return importlib.import_module('longctx.cli')\n"
    )
    (package / "rope" / "config.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    problems = violations(package / "rope" / "bad.py")
    assert [problem.split(":")[0] for problem in problems] == ["line 5", "line 6", "line 7"]
    assert "up from rope" in problems[0] and "sideways from rope" in problems[1] and "longctx.cli" in problems[2]
