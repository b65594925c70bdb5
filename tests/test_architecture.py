"""The shape of the code: no import circles, and every backend package built from the same files."""

from __future__ import annotations

import ast
from pathlib import Path

import rgexport
from rgexport.backends import BACKENDS

ROOT = Path(rgexport.__file__).parent
BACKENDS_DIR = ROOT / "backends"
# Each backend package: the Backend class (backend.py) over its stages (export.py, recipes.py), the
# calibrated recipes' sample collection (calibration.py), the runner in its runtime (runner.py) and what one
# decode step reads of the weights (weights.py).
BACKEND_FILES = {"__init__.py", "backend.py", "export.py", "recipes.py", "calibration.py", "runner.py", "weights.py",
                 "app_samples.py"}  # device.py where the emulated device runs the runtime (not Core ML)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """rgexport modules that `path` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports module a.b.c where c is a module, else a.b.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_has_no_circles():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_backend_package_has_the_same_files():
    packages = sorted(p.name for p in BACKENDS_DIR.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(BACKENDS)
    for name in packages:
        files = {p.name for p in (BACKENDS_DIR / name).glob("*.py")}
        assert BACKEND_FILES <= files, (name, sorted(BACKEND_FILES - files))
    # The registry names each backend's package; the package exports the backend class.
    for name, (module, cls) in BACKENDS.items():
        assert module == f"rgexport.backends.{name}"
        init = ast.parse((BACKENDS_DIR / name / "__init__.py").read_text())
        assert cls in {a.asname or a.name for n in ast.walk(init) if isinstance(n, ast.ImportFrom) for a in n.names}


# Outside rgexport/backends/, only the registry (rgexport/registry.py) and the target profiles (targets/*.toml)
# name a backend: everything else asks the registry or a profile.
NAMES_BACKENDS = {ROOT / "registry.py"}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (module, class, function): prose may name a backend."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def backend_names_in(path: Path) -> list[str]:
    """Where `path` names a backend in code: a string literal that is a backend's name, or an import of a
    backend's package (comments and docstrings are prose, and not looked at)."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    where = path.relative_to(ROOT.parent) if ROOT.parent in path.parents else path.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                and node.value.strip().lower() in BACKENDS:
            found.append(f"{where}:{node.lineno}: {node.value!r}")
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for m in modules:
            if any(m == f"rgexport.backends.{n}" or m.startswith(f"rgexport.backends.{n}.") for n in BACKENDS):
                found.append(f"{where}:{node.lineno}: import {m}")
    return found


def test_only_the_registry_and_the_profiles_name_a_backend():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if BACKENDS_DIR in path.parents or path in NAMES_BACKENDS:
            continue
        found += backend_names_in(path)
    assert found == [], "\n".join(found)


def test_the_backend_name_finder_finds_them(tmp_path):
    f = ROOT / "registry.py"  # names every backend by design
    assert len(backend_names_in(f)) >= len(BACKENDS)
    probe = tmp_path / "probe.py"
    probe.write_text('"""The onnx backend, in prose."""\n# tflite in a comment\nfrom rgexport.backends.onnx import x\n'
                     'if b == "coreml":\n    pass\n')
    assert [line.split(": ", 1)[1] for line in backend_names_in(probe)] == ["import rgexport.backends.onnx",
                                                                           "'coreml'"]
