"""The package's import graph: no module imports, at any depth or inside a function, a module that imports it
back (a cycle hides which module owns what, and breaks on the first import reordering); and the library does not
import the lesson (kopru.lesson), which only the command line offers."""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kopru

PACKAGE = Path(kopru.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("kopru", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (`from kopru.x import y` names kopru.x, or
    kopru.x.y when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kopru"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kopru"))
    return found & modules


@functools.cache  # parsed once for the module's tests (they only read it)
def import_graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "kopru.model" in graph and "kopru.connectors.qformer" in graph
    # The package's __init__ re-exports the public names, so it imports the modules; none imports it back.
    package_users = sorted(name for name, targets in graph.items() if "kopru" in targets)
    assert package_users == [], f"modules importing the package itself (import the owner module instead): {package_users}"
    assert cycles(graph) == []


# The command line offers the lesson's commands (`kopru compare`, `demo`, `pretrain-tiny`); nothing else of the
# library may need the lesson (the default backbones' place is `kopru.backbones`).
LESSON = "kopru.lesson"
LESSON_USERS = {"kopru.cli"}


def _is_lesson(name: str) -> bool:
    return name == LESSON or name.startswith(LESSON + ".")


def test_the_library_does_not_import_the_lesson_anywhere():
    """Statically: no library module names the lesson in any import, a lazy one inside a function included."""
    graph = import_graph()
    users = sorted(name for name, targets in graph.items()
                   if not _is_lesson(name) and name not in LESSON_USERS and any(map(_is_lesson, targets)))
    assert users == [], f"library modules importing {LESSON} (use kopru.backbones, or move the code): {users}"


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and every module: 7 s
def test_importing_every_library_module_loads_no_lesson_module():
    """At run time, independently of the import graph above: a fresh interpreter imports every library module
    (each file under src/kopru outside the lesson and the CLI) and then lists the lesson modules in sys.modules."""
    library = sorted(name for name in import_graph() if not _is_lesson(name) and name not in LESSON_USERS)
    assert len(library) > 50 and "kopru.training.loop" in library
    program = ("import importlib, json, sys\n"
               f"for name in {library!r}:\n"
               "    importlib.import_module(name)\n"
               f"print(json.dumps(sorted(m for m in sys.modules if m == {LESSON!r} or m.startswith({LESSON + '.'!r}))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], f"loaded by library modules: {result.stdout}"


def test_the_package_loads_its_public_names_on_first_use():
    """`import kopru` alone loads neither torch nor transformers (a `kopru compare` worker, `import
    kopru.data.turkish` start without them), and every public name still resolves to its owner's object."""
    program = "import json, sys, kopru; print(json.dumps(sorted({'torch', 'transformers'} & set(sys.modules))))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []

    from kopru.connectors.qformer import QFormerConfig
    from kopru.geometry import image_positions
    from kopru.model import KopruForConditionalGeneration

    assert (kopru.QFormerConfig, kopru.KopruForConditionalGeneration, kopru.image_positions) == (
        QFormerConfig, KopruForConditionalGeneration, image_positions)
    assert set(kopru.__all__) == set(kopru._OWNERS)  # the public list and the lazy table name the same
    assert all(getattr(kopru, name) is not None for name in kopru.__all__) and set(kopru.__all__) <= set(dir(kopru))
    with pytest.raises(AttributeError, match="no attribute 'KopruModel'"):
        kopru.KopruModel  # noqa: B018


# kopru.geometry is the size arithmetic only (ints and dataclasses): no tensors, pixels or model code. It reads
# facts about connectors (`strategy_class`) and encoders (`VISION_BACKBONES`) from their owners, nothing else.
GEOMETRY = "kopru.geometry"
GEOMETRY_FORBIDDEN = ("torch", "PIL", "numpy", "transformers")
GEOMETRY_MAY_IMPORT = {"kopru.connectors", "kopru.vision"}


def _runtime_imports(source: str) -> set[str]:
    """Modules `source` imports anywhere (inside functions too) except under `if TYPE_CHECKING:`."""
    tree = ast.parse(source)
    hidden = {id(node) for block in ast.walk(tree)
              if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
              for statement in block.body for node in ast.walk(statement)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _forbidden(modules: set[str]) -> list[str]:
    return sorted(name for name in modules if name.split(".")[0] in GEOMETRY_FORBIDDEN)


def test_the_import_walk_sees_runtime_imports_and_skips_type_checking_ones():
    source = ("from typing import TYPE_CHECKING\nimport torch.nn\nif TYPE_CHECKING:\n    from transformers import X\n"
              "def f():\n    from PIL import Image\n")
    assert _forbidden(_runtime_imports(source)) == ["PIL", "torch.nn"]


def test_geometry_imports_no_tensor_pixel_or_model_library():
    files = sorted((PACKAGE / "geometry").glob("*.py"))
    assert {path.stem for path in files} >= {"__init__", "anyres", "dynamic", "tiles", "plan", "positions"}
    imports = {path.name: _runtime_imports(path.read_text(encoding="utf-8")) for path in files}
    assert {name: _forbidden(found) for name, found in imports.items() if _forbidden(found)} == {}
    outside = {name: sorted(module for module in found if module.startswith("kopru")
                            and not module.startswith(GEOMETRY) and module not in GEOMETRY_MAY_IMPORT)
               for name, found in imports.items()}
    assert {name: found for name, found in outside.items() if found} == {}
