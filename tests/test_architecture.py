"""The layers of ``src/difflab`` (docs/architecture.md): which package may import which, checked on the
source's import statements, and no import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import difflab

SRC = Path(difflab.__file__).parent

# What each layer may import (besides itself and the package root's __version__), bottom to top.
_BASE = {"errors", "config"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "cli_types": {"errors"},
    "outputs": _BASE,
    "world": {"errors", "outputs", "cli_types"},
    "diffusion": {"errors", "outputs", "cli_types"},
    "train": _BASE,
    "text": _BASE | {"world"},
    "data": _BASE | {"world"},
    "nn": _BASE | {"text"},
    "viz": {"data", "outputs"},
    "eval": _BASE | {"data", "world"},
}
ALLOWED["models"] = set().union(*ALLOWED.values(), ALLOWED) - {"models"}
ALLOWED["demo"] = ALLOWED["models"] | {"models"}
ALLOWED["app"] = ALLOWED["demo"] | {"demo"}  # the web page: every command's library, as the CLI
ALLOWED["cli"] = ALLOWED["app"] | {"app"}
ALLOWED["__main__"] = {"cli"}
ALLOWED["difflab"] = set()  # the package root holds __version__ only


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}  # fmt: skip


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The difflab modules ``name`` imports at any depth of its source (module level or not)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("difflab")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.startswith("difflab"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return found - {name}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "difflab"


def test_every_layer_imports_only_the_layers_below_it():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        layer = _layer(name)
        assert layer in ALLOWED, f"{name}: layer '{layer}' is missing from ALLOWED (and docs/architecture.md)"
        for target in _imports(name, path, modules):
            other = _layer(target)
            if other not in (layer, "difflab") and other not in ALLOWED[layer]:
                bad.append(f"{name} -> {target}")
    assert not bad, bad


def test_no_import_cycle_between_modules():
    modules = _modules()
    edges = {m: {t for t in _imports(m, p, modules) if t in modules} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])


def test_the_checks_can_fail(tmp_path):
    """The import reader sees relative and nested imports: a cycle and a layer break are caught."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from difflab.models import pixel\n")
    assert "difflab.models.pixel" in _imports("difflab.world.a", a, {"difflab.models.pixel": a})
    assert "models" not in ALLOWED["world"]
