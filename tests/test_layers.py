"""The package's layers (docs/design.md, Package layers): a module of lib/ imports only from its
own package or from packages below it, so data flows one way.

Every import statement of every module is read with `ast`, including imports inside functions
and relative imports (resolved against the module's package).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"

# lowest first; a package may import from itself and from any package listed before it
LAYERS = ["utils", "flame", "render", "dataset", "model", "inference"]
# lib/synthetic (the synthetic data generator) sits beside the stack: it may use the packages
# below the model, and only tools/ and tests/ use it
SIDE = {"synthetic": {"utils", "flame", "render", "dataset"}}


def allowed(package: str) -> set[str]:
    """Packages of lib that `package` may import from (itself included)."""
    if package in SIDE:
        return SIDE[package] | {package}
    return set(LAYERS[:LAYERS.index(package) + 1])


def lib_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported lib package) for every import of lib.<package> in the module at path."""
    rel = path.relative_to(LIB.parent).with_suffix("")
    parts = list(rel.parts)                        # e.g. ["lib", "model", "deformer"]
    package_parts = parts[:-1]                     # the package (also for an __init__.py)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                         # relative: resolve against the package
                base = package_parts[:len(package_parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:            # `from . import x`: x are submodules
                    names = [f"{mod}.{a.name}" for a in node.names]
                else:
                    names = [mod]
            elif node.module:
                names = [node.module]
        for name in names:
            bits = name.split(".")
            if bits[0] == "lib" and len(bits) > 1:
                found.append((node.lineno, bits[1]))
    return found


def modules():
    return sorted(p for p in LIB.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS) | set(SIDE), \
        f"packages of lib/ without a layer in this test: {packages ^ (set(LAYERS) | set(SIDE))}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(LIB.parent)))
def test_imports_go_down_the_layers(path):
    rel = path.relative_to(LIB)
    if len(rel.parts) == 1:                        # lib/__init__.py
        return
    package = rel.parts[0]
    bad = [f"line {line}: lib.{target}" for line, target in lib_imports(path)
           if target not in allowed(package)]
    assert not bad, (f"{path.relative_to(LIB.parent)} (package {package}) imports from a "
                     f"higher layer or a side package: {bad}")


def test_nothing_in_the_stack_imports_the_synthetic_generator():
    for path in modules():
        package = path.relative_to(LIB).parts[0]
        if package in SIDE:
            continue
        assert all(t not in SIDE for _, t in lib_imports(path)), path


def test_the_checker_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    """The checker itself, on a module written here: a relative import two levels up and an
    import inside a function are both resolved to their lib package."""
    fake = tmp_path / "lib" / "dataset"
    fake.mkdir(parents=True)
    mod = fake / "m.py"
    mod.write_text("from ..model import deformer\n"
                   "def f():\n    from lib.inference.avatar import Avatar\n"
                   "from .fine import X\n")
    monkeypatch.setattr(sys.modules[__name__], "LIB", tmp_path / "lib")
    assert sorted(lib_imports(mod)) == [(1, "model"), (3, "inference"), (4, "dataset")]
    assert not {"model", "inference"} <= allowed("dataset")
