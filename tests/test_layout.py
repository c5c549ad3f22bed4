"""The import direction between rooms (subpackages), as docs/design.md draws it, and no circles.

The allowed arrows are read from the ```layers block of docs/design.md, so the picture a
contributor reads is the rule the build enforces.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("meme", "nas")


def read_layers(text: str) -> dict[str, set[str]]:
    """``A <- B <- C`` lines -> {room: rooms it may import directly}."""
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/design.md has no ```layers block"
    may: dict[str, set[str]] = {}
    for line in block.group(1).splitlines():
        rooms = [r.strip() for r in line.split("<-") if r.strip()]
        for lower, upper in zip(rooms, rooms[1:]):
            may.setdefault(upper, set()).add(lower)
            may.setdefault(lower, set())
    return may


def closure(may: dict[str, set[str]]) -> dict[str, set[str]]:
    """Every room a room may import, through any chain of arrows."""
    out = {}
    for room in may:
        seen, todo = set(), [room]
        while todo:
            for lower in may.get(todo.pop(), ()):
                if lower not in seen:
                    seen.add(lower)
                    todo.append(lower)
        out[room] = seen
    return out


def modules(root: Path = REPO) -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports anywhere in it (``from pkg import mod`` resolved to the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in PACKAGES}
    return out


def room_of(module: str, rooms: set[str]) -> str:
    """The longest room name that is the module or a package above it."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in rooms:
            return ".".join(parts[:k])
    raise AssertionError(f"{module} is in no room of docs/design.md's ```layers block")


def violations(root: Path, layers_text: str) -> list[str]:
    may = closure(read_layers(layers_text))
    found = modules(root)
    bad = []
    for name, path in sorted(found.items()):
        here = room_of(name, set(may))
        for target in sorted(imports_of(path, name, set(found))):
            there = room_of(target, set(may))
            if there != here and there not in may[here]:
                bad.append(f"{name} ({here}) imports {target} ({there}): against the arrows")
    return bad


def circles(root: Path) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), over all imports."""
    found = modules(root)
    graph = {n: {t for t in imports_of(p, n, set(found)) if t in found and t != n} for n, p in found.items()}
    # a package's own __init__ importing its modules is not a circle a reader trips on
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


LAYERS = (REPO / "docs" / "design.md").read_text()


def test_every_import_follows_the_arrows_of_docs_design():
    assert violations(REPO, LAYERS) == []


def test_no_import_circles():
    assert circles(REPO) == []


def test_a_reversed_arrow_is_caught():
    """meme.training imports meme.sampling today; declared the other way round, that is a violation."""
    flipped = LAYERS.replace("meme.sampling <- meme.training <- meme.speed",
                             "meme.training <- meme.sampling <- meme.speed")
    assert flipped != LAYERS
    bad = violations(REPO, flipped)
    assert any("(meme.training) imports meme.sampling" in b for b in bad), bad


def test_a_circle_is_caught(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "meme" / "a.py").write_text("from meme import b\n")
    (tmp_path / "meme" / "b.py").write_text("def f():\n    import meme.a\n")
    assert circles(tmp_path) == [["meme.a", "meme.b"]]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_rooms_stay_small_and_say_what_they_hold(pkg):
    for room in sorted(p for p in (REPO / pkg).iterdir() if (p / "__init__.py").is_file()):
        mods = [p for p in room.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        assert len(mods) <= 12, f"{room.relative_to(REPO)} holds {len(mods)} modules"
        doc = ast.get_docstring(ast.parse((room / "__init__.py").read_text()))
        assert doc and "import" in doc, f"{room.relative_to(REPO)}/__init__.py must say what lives there and what it may import"


def test_no_module_name_means_two_things():
    """A module's file name appears once across both packages (a room's home module such as
    ``nas/space/space.py`` is the room's own name, not a second meaning)."""
    seen: dict[str, list[str]] = {}
    for name, path in modules().items():
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.stem, []).append(name)
    assert {leaf: names for leaf, names in seen.items() if len(names) > 1} == {}
