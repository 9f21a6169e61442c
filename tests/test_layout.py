"""The layout's rules, checked on the source: no import cycle between djc's modules (lazy imports inside
functions count: a cycle is a cycle whenever it closes), and no reference to a document outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("djc", "tune")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (imports for annotations only never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """djc/tune modules that `name` imports anywhere in its file (top level or inside functions) at run time."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from djc import evaluate` imports the module djc.evaluate; `from djc.x import f` imports djc.x.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 50  # the parser sees the imports at all
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Shorthands for documents that live outside this repository (the team's notes): a reader of the project cannot
# open them. docs/methods.md and docs/data.md are in the repository and are named by their path.
OUTSIDE = re.compile(r"design\.md|style\.md|contract \d|(?<!docs/)methods\.md section|\.\./shared")


def test_no_reference_to_a_document_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "djc", "tune", "tests", "docs", "jobs", "benchmarks", "README.md",
                            "cluster.yaml", "docker"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    hits = []
    for f in files:
        if f == "tests/test_layout.py" or not (ROOT / f).is_file():
            continue
        for i, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{f}:{i}: {line.strip()[:100]}")
    assert hits == []


def test_every_docs_path_named_in_the_docs_exists():
    named = set()
    for f in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        named |= {(f, m) for m in re.findall(r"\bdocs/[\w/.-]+\.md\b", f.read_text())}
    missing = [f"{f.relative_to(ROOT)} names {m}" for f, m in sorted(named) if not (ROOT / m).is_file()]
    assert missing == []
