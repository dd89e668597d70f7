"""The rooms of ``weight_sync/`` import only downwards.

Each module belongs to a room; a room may import from rooms on a lower floor (and from
its own), never from a higher one or a sibling on the same floor. Imports under
``if TYPE_CHECKING:`` are for annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "weight_sync"
#: The top-level ``collectors/`` folder is installed as ``weight_sync.collectors``.
COLLECTORS = ROOT / "collectors"

#: room -> floor; the learner and the collector share a floor and never import each other.
FLOORS = {
    "errors": 0, "config": 1, "metrics": 1, "wire": 2, "control": 3, "transports": 4,
    "handshake": 5, "learner": 6, "collector": 6, "torchrl": 7, "training": 7,
    "__init__": 8, "collectors": 9, "cli": 10,
}
#: ``weight_sync.collectors`` is an application of the public API: it may import the
#: package's facade (``from weight_sync import WeightSender``).


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    if path.is_relative_to(COLLECTORS):
        rel = Path("weight_sync", "collectors", path.relative_to(COLLECTORS)).with_suffix("")
    else:
        rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """``weight_sync`` modules imported outside ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "weight_sync":  # a submodule, or a name of the facade
                found.extend((node.lineno, f"weight_sync.{a.name}"
                              if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                              else "weight_sync") for a in node.names)
            elif node.module.startswith("weight_sync."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names
                         if a.name.startswith("weight_sync."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


MODULES = sorted([*PACKAGE.rglob("*.py"), *COLLECTORS.rglob("*.py")])


def test_every_room_has_a_floor() -> None:
    rooms = {_room(_module_name(p)) for p in MODULES}
    assert rooms <= set(FLOORS), f"rooms without a floor: {rooms - set(FLOORS)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down(path: Path) -> None:
    module = _module_name(path)
    room = _room(module)
    wrong = []
    for line, target in _runtime_imports(ast.parse(path.read_text())):
        other = _room(target)
        if other == room:
            continue
        if FLOORS[other] >= FLOORS[room]:
            wrong.append(f"line {line}: {target} (floor {FLOORS[other]})")
    assert not wrong, f"{module} (room {room!r}, floor {FLOORS[room]}) imports upwards: {wrong}"
