"""The import structure: no cycle, and no module imports from a layer above its own (DESIGN.md,
README "Architecture"). Read from the source with ``ast`` (every import statement, at the top of
a file or inside a function), so a new upward import fails here before it can hide a cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: module (or package prefix) -> layer, bottom up; a module may import from its own layer or below
LAYERS = {
    "gradsparse._validate": 1, "gradsparse.io": 1, "gradsparse.runtime": 1, "gradsparse.parallel": 1,
    "gradsparse.activations": 1, "gradsparse.errors": 1,
    "gradsparse.data": 2, "gradsparse.models": 2, "gradsparse.monitors": 2, "gradsparse.flatness": 2,
    "gradsparse.rmt": 2, "gradsparse.powerlaw": 2, "gradsparse.covariance": 2, "gradsparse.weights": 2, "gradsparse.sentences": 2,
    "gradsparse.plugins": 3, "gradsparse.config": 3, "gradsparse.figures": 3, "gradsparse.figures_spectra": 3,
    "gradsparse.distill": 3, "gradsparse.nnx": 3,
    "gradsparse.factory": 4, "gradsparse.step": 4, "gradsparse.memory": 4,
    "gradsparse.checkpoint": 5, "gradsparse.spectra": 5.1, "gradsparse.measure": 5.2,
    "gradsparse.runfolder": 6, "gradsparse.loop": 6.5,
    "gradsparse.train": 7, "gradsparse.train_seeds": 7, "gradsparse.relufy": 7,
    "gradsparse.runplan": 7.5, "gradsparse.executors": 7.6,
    "theory_checks.verdicts": 8.0, "theory_checks.plan": 8.05, "theory_checks.protocol": 8.1, "theory_checks.context": 8.2,
    "theory_checks.g": 8.3, "theory_checks.report": 8.4, "theory_checks.suite": 8.5, "theory_checks.pilot": 8.6,
    "gradsparse.cli": 9, "gradsparse.commands": 9,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(mod: str) -> float | None:
    best = None
    for prefix, layer in LAYERS.items():
        if mod == prefix or mod.startswith(prefix + ".") or (prefix.endswith(".g") and mod.startswith(prefix)):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def _imports(path: Path) -> set[str]:
    """Project modules imported by ``path`` (``from pkg import mod`` counts as pkg.mod when it is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (ROOT / Path(*sub.split("."))).is_dir():
                    out.add(sub)
    return {m for m in out if m.split(".")[0] in ("gradsparse", "theory_checks")}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in ("gradsparse", "theory_checks") for p in (ROOT / pkg).rglob("*.py")]
    return {_module_name(p): _imports(p) for p in files}


def test_every_module_has_a_layer():
    missing = [m for m in _graph() if m not in ("gradsparse", "theory_checks") and _layer(m) is None]
    assert not missing, f"modules without a layer in LAYERS: {missing}"


def test_no_import_from_a_higher_layer():
    bad = []
    for mod, deps in _graph().items():
        lm = _layer(mod)
        if lm is None:  # the package facades (gradsparse/__init__.py: lazy re-exports)
            continue
        for dep in deps:
            ld = _layer(dep)
            if ld is not None and ld > lm:
                bad.append(f"{mod} (layer {lm}) imports {dep} (layer {ld})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    full = _graph()  # parsed once: every module's imports
    graph = {m: {d for d in deps if d in full} for m, deps in full.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == m or d.startswith(m + ".") or m.startswith(d + "."):
                continue  # a package and its own submodules
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layer_check_detects_an_upward_import(tmp_path):
    """The rule itself: a data-layer module importing the training loop is reported."""
    assert _layer("gradsparse.data") < _layer("gradsparse.train")
    assert _layer("theory_checks.g05_sgd_noise") == 8.3 and _layer("gradsparse.plugins.noise") == 3
    f = tmp_path / "m.py"
    f.write_text("from gradsparse.train import train\nimport gradsparse.step\ndef f():\n    from gradsparse import cli\n")
    assert _imports(f) >= {"gradsparse.train", "gradsparse.step"}
