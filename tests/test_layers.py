"""The package's import graph shows its architecture: layers, every import pointing down, no circle.

Built from the modules themselves (every ``import`` statement, function-level and TYPE_CHECKING ones
included), so a new import that climbs a layer, or two modules that import each other, fail here
before they blur the structure (docs/development.md lists the layers).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src"

# Bottom to top. Packages on one floor sit side by side: neither imports the other.
FLOORS: list[tuple[str, ...]] = [
    ("errors", "units"),
    ("dist", "format"),
    ("files", "s3"),
    ("catalog",),
    ("state", "commit"),
    ("run",),
    ("report", "integrations", ""),  # "" is the package's face, ckptguard/__init__.py
    ("train",),
    ("cli",),
    ("__main__",),
]
FLOOR_OF = {room: floor for floor, rooms in enumerate(FLOORS) for room in rooms}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted((SRC / "ckptguard").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The package's modules that `name` imports (``from ckptguard import x`` names submodule x, or the face)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("ckptguard") and target != name:
                yield target


def room(module: str) -> str:
    """The top-level package or module of ckptguard that holds `module` ("" for the face)."""
    return module.split(".")[1] if "." in module else ""


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports(name, path, known)) for name, path in known.items()}


def test_every_module_sits_on_a_floor() -> None:
    homeless = sorted({room(m) for m in graph()} - set(FLOOR_OF))
    assert not homeless, f"place these in FLOORS (and in docs/development.md): {homeless}"


def test_imports_only_point_down() -> None:
    climbing = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in sorted(targets)
        if room(a) != room(b) and FLOOR_OF.get(room(b), -1) >= FLOOR_OF.get(room(a), -1)
    ]
    assert not climbing, "imports that climb a floor or cross to a neighbour on it:\n" + "\n".join(climbing)


def test_the_format_layer_imports_nothing_but_errors() -> None:
    outside = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        if room(a) == "format"
        for b in sorted(targets)
        if room(b) not in ("format", "errors")
    ]
    assert not outside, "\n".join(outside)


def test_no_two_modules_import_each_other_through_any_path() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ckptguard.run import manager\n", "ckptguard.run -> ckptguard.run.manager"),
        ("from ckptguard import CheckpointManager\n", "-> ckptguard"),
    ],
)
def test_the_graph_sees_an_upward_import(tmp_path: Path, source: str, expected: str) -> None:
    """The check can fail: a format module importing the manager (or the face) is an upward arrow."""
    known = {**modules(), "ckptguard.format.probe": tmp_path / "probe.py"}
    (tmp_path / "probe.py").write_text(source)
    found = set(imports("ckptguard.format.probe", tmp_path / "probe.py", known))
    target = expected.rpartition(" ")[2]
    assert target in found
    assert FLOOR_OF[room(target)] > FLOOR_OF["format"]


def _calls(name: str) -> list[str]:
    """`module:function` of every call of a function or method named `name` (the innermost function holding it)."""
    found = set()

    class Calls(ast.NodeVisitor):
        def __init__(self, module: str) -> None:
            self.module, self.function = module, "<module>"

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            outer, self.function = self.function, node.name
            self.generic_visit(node)
            self.function = outer

        def visit_Call(self, node: ast.Call) -> None:
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if callee == name:
                found.add(f"{self.module}:{self.function}")
            self.generic_visit(node)

    for module, path in modules().items():
        Calls(module.removeprefix("ckptguard.")).visit(ast.parse(path.read_text(), str(path)))
    return sorted(found)


def test_one_place_builds_manifests_and_one_runs_a_save() -> None:
    """The manifest is made by Manifest.new alone, called by the staged save alone (parsing aside); staging
    directories are opened by the directory committer alone (and the upload's scratch copy of the tier),
    the partial file of a checkpoint that is one file by the file committer alone."""
    assert _calls("Manifest") == ["format.manifest:parse_manifest"]
    assert _calls("new") == ["commit.sequence:commit"]
    assert _calls("create_staging") == ["commit.publish:begin", "run.tiered:_link_aside"]
    assert _calls("create_staging_file") == ["commit.file_publish:begin"]
    assert [c for c in _calls("publish") if not c.startswith("commit.")] == []


def test_one_definition_of_newest_first() -> None:
    definitions = [
        f"{m}:{node.name}"
        for m, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name in ("newest_first", "save_order")
    ]
    assert definitions == ["ckptguard.catalog.checkpoint:save_order", "ckptguard.catalog.checkpoint:newest_first"]
    by_hand = [m for m, path in modules().items() if "c.sequence, c.step" in path.read_text()]
    assert by_hand == ["ckptguard.catalog.checkpoint"]  # save_order itself


def test_one_rule_makes_save_sequences_and_one_executor_carries_out_retention() -> None:
    """A new save's sequence comes from catalog.checkpoint.next_sequence alone (the opened run hands them out);
    only a Pruner acts on retention's verdict, and it removes through a committer."""
    assert _calls("next_sequence") == [
        "integrations.staged:finish",  # the run's, through integrations.staged:next_sequence
        "integrations.staged:next_sequence",  # RunDir.next_sequence, or the rule for a directory not opened
        "run.run_dir:_prepare",  # the rule, over every save found at open
        "run.save:_persist",  # RunDir.next_sequence
    ]
    by_hand = [m for m, path in modules().items() if "sequence for c in" in path.read_text()]
    assert by_hand == ["ckptguard.catalog.checkpoint"]
    assert _calls("doomed") == ["run.pruning:prune"]
