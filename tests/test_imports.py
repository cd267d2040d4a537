"""Imports point one way (DESIGN.md): contract <- io / distributed / sharding <- models <- checkpoints
<- data / hf <- inference <- training <- analysis <- serving <- cli <- the CLI modules.

The import-linter contracts in pyproject.toml state the layers (CI also runs `lint-imports`); these
tests run them, show that they catch an arrow pointing back up, and check from the source itself
that no import circle exists and that function-level imports only defer heavy optional packages.
"""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "unijax"
DEFERRED_OK = {"matplotlib", "torch", "transformers", "peft", "pyarrow"}  # heavy and optional: imported on use


def _lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("lint-imports") or "lint-imports", "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layer_contracts_hold():
    r = _lint_imports(REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_the_contracts_catch_an_import_pointing_back_up(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "unijax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    layers = tmp_path / "unijax" / "models" / "layers.py"
    layers.write_text(layers.read_text() + "\nfrom unijax.training import loop  # noqa: E402 (a back arrow)\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0 and "BROKEN" in r.stdout
    assert "unijax.models.layers -> unijax.training.loop" in r.stdout


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imported(module: str, node: ast.AST, modules: dict[str, pathlib.Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def test_no_import_circle_and_no_function_level_imports_but_deferred_heavy_packages():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    deferred = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = {t for n in top for t in _imported(name, n, modules)}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        root = (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name) or ""
                        if root.split(".")[0] not in DEFERRED_OK:
                            deferred.append(f"{name}.{fn.name}: {ast.unparse(n)}")
    assert not deferred, deferred
    # a package's __init__ may import its own modules (a re-exporting facade): not a circle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]):
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
