"""Dependencies point one way: ``bench → cat → engine → kernels`` (docs/design.md §3).

Every import of every module under kernels/, engine/, cat/, bench/ and cat_engine/ is read with
``ast``: module-level and function-local, ``import x`` and ``from x import y``, relative ones, and
``importlib.import_module("...")`` with a literal name. An import of a higher layer fails the test
with the file, the line and the edge. ``cat_engine/cli.py`` and ``cat_engine/__main__.py`` sit on
top and may import every layer; the package root ``cat_engine`` (its ``__init__``, which holds
only the version) may be imported from anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cat_engine"
# folder -> (import name, rank); a module may import modules of its own rank or lower.
LAYERS = {
    "kernels": (f"{PACKAGE}.kernels", 0),
    "engine": (f"{PACKAGE}.engine", 1),
    "cat": (f"{PACKAGE}.cat", 2),
    "bench": (f"{PACKAGE}.bench", 3),
    "cat_engine": (PACKAGE, 4),  # the CLI on top
}
NAMES = {name: rank for name, rank in LAYERS.values()}
# cat_engine.cli, cat_engine.__main__: the modules of the top layer.
TOP_MODULES = {f"{PACKAGE}.{p.stem}" for p in (ROOT / "cat_engine").glob("*.py") if p.stem != "__init__"}


def layer_of(module: str) -> tuple[str, int] | None:
    """The layer (its import name and rank) of a dotted module name; ``None`` outside the package
    and for the package root itself (``cat_engine``, ``cat_engine.__version__``)."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    sub = ".".join(parts[:2])
    if sub in NAMES:
        return sub, NAMES[sub]
    if sub in TOP_MODULES:
        return PACKAGE, NAMES[PACKAGE]
    return None


def module_name(path: str) -> str:
    """``engine/vram.py`` -> ``cat_engine.engine.vram``; ``cat_engine/cli.py`` -> ``cat_engine.cli``."""
    parts = Path(path).with_suffix("").parts
    prefix = LAYERS[parts[0]][0]
    rest = [p for p in parts[1:] if p != "__init__"]
    return ".".join([prefix, *rest])


def _imported(tree: ast.AST, path: str):
    """``(line, module)`` for every import in ``tree``, relative ones resolved against ``path``."""
    this = module_name(path)
    package = this if Path(path).name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            if module == PACKAGE:  # ``from cat_engine import engine`` names a sub-package
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            yield node.lineno, node.args[0].value


def back_edges(path: str, source: str) -> list[str]:
    """Every import in ``source`` (the text of ``path``, relative to the repository root) of a
    higher layer than its own, as ``path:line: module (layer) imports module (layer)``."""
    this = module_name(path)
    own_name, own_rank = layer_of(this) or (PACKAGE, NAMES[PACKAGE])
    found = []
    for line, module in _imported(ast.parse(source, filename=path), path):
        layer = layer_of(module)
        if layer is not None and layer[1] > own_rank:
            found.append(f"{path}:{line}: {this} ({own_name}) imports {module} ({layer[0]})")
    return sorted(set(found))


def package_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for folder in LAYERS for p in (ROOT / folder).rglob("*.py"))


def test_the_tree_has_no_back_edges():
    files = package_files()
    assert len(files) > 40 and "engine/vram.py" in files and "cat_engine/cli.py" in files
    edges = [e for f in files for e in back_edges(f, (ROOT / f).read_text(encoding="utf-8"))]
    assert not edges, "imports against bench → cat → engine → kernels:\n" + "\n".join(edges)


@pytest.mark.parametrize(
    "path, source, edge",
    [
        (
            "engine/fake.py",
            "import torch\n\ndef step():\n    from cat_engine.cat.loss import cat_loss\n",
            "engine/fake.py:4: cat_engine.engine.fake (cat_engine.engine) imports cat_engine.cat.loss",
        ),
        ("kernels/fake.py", "import cat_engine.engine.lora\n", "kernels/fake.py:1:"),
        ("engine/fake.py", "from ..cat import loss\n", "imports cat_engine.cat (cat_engine.cat)"),
        ("engine/sub/__init__.py", "from ...bench import harness\n", "imports cat_engine.bench"),
        ("engine/fake.py", "from cat_engine import cat\n", "imports cat_engine.cat (cat_engine.cat)"),
        (
            "cat/fake.py",
            "import importlib\nm = importlib.import_module('cat_engine.bench.cli')\n",
            "cat/fake.py:2:",
        ),
        (
            "bench/fake.py",
            "if True:\n    from cat_engine import cli\n",
            "imports cat_engine.cli (cat_engine)",
        ),
    ],
)
def test_a_planted_back_edge_is_found(path, source, edge):
    found = back_edges(path, source)
    assert len(found) == 1 and edge in found[0], found


@pytest.mark.parametrize(
    "path, source",
    [
        ("engine/fake.py", "from cat_engine.kernels.lora_linear import lora_linear\nfrom . import lora\n"),
        ("cat/fake.py", "from cat_engine.engine import vram\nfrom .loss import cat_loss\nimport torch\n"),
        (
            "bench/fake.py",
            "def f():\n    from cat_engine.cat.loss import cat_loss\n    import cat_engine.kernels\n",
        ),
        ("cat_engine/cli.py", "import importlib\nimportlib.import_module('cat_engine.bench.cli')\n"),
        ("engine/fake.py", "from cat_engine import __version__\n"),
    ],
)
def test_imports_along_the_rule_pass(path, source):
    assert back_edges(path, source) == []
