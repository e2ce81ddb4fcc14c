"""The package's shape: no import cycles, no private names imported across modules, each part importing only
the parts below it (docs/architecture.md), and DeepSpeed only where engines are built. Read from the source with
``ast``, so an import hidden inside a function still counts."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rmt_scale"

# The layering: what each part of the package may import from the package. A module is in the longest part its
# name starts with, and an allowed name covers everything below it, so new modules are covered as they come.
LAYERS = {
    "rmt_scale": ["rmt_scale.model"],  # the root: the model's public names, and nothing imports it
    "rmt_scale.runtime": ["rmt_scale.runtime"],
    "rmt_scale.rng": [],
    "rmt_scale.model": ["rmt_scale.model", "rmt_scale.runtime", "rmt_scale.rng"],
    # IGNORE_INDEX, and the tokenizer inside a GGUF backbone's file
    "rmt_scale.data": ["rmt_scale.data", "rmt_scale.model.segments", "rmt_scale.model.gguf"],
    "rmt_scale.data.tars": [],
    "rmt_scale.pipeline": ["rmt_scale.pipeline", "rmt_scale.model", "rmt_scale.runtime", "rmt_scale.rng"],
    "rmt_scale.profiling": ["rmt_scale.profiling", "rmt_scale.model", "rmt_scale.runtime"],
    "rmt_scale.training": [
        "rmt_scale.training",
        "rmt_scale.data",
        "rmt_scale.model",
        "rmt_scale.pipeline",
        "rmt_scale.runtime",
        "rmt_scale.rng",
    ],
    "rmt_scale.cli": ["rmt_scale"],  # the launchers' code: anything, and nothing imports it
}
# DeepSpeed where engines are built and run, the ZeRO-3 gather of a partitioned parameter (a user may hit it
# outside training), the flops profiler, and the launchers
DEEPSPEED_USERS = ["rmt_scale.training", "rmt_scale.model.modeling", "rmt_scale.profiling.measure", "rmt_scale.cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module name a (possibly relative) ``from ... import`` refers to."""
    if level == 0:
        return target or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` for every import of a package module anywhere in the file."""
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, is_package, node.level, node.module)
            if source not in modules:
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in modules]
            found += [(module, []) for module in submodules]
            plain = [n for n in names if f"{source}.{n}" not in modules]
            if plain:
                found.append((source, plain))
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def absolute_imports(path: Path) -> list[str]:
    """Every module imported by absolute name anywhere in the file, the package's and third parties'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(node.module)
    return found


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    graph = {
        name: sorted({target for target, _ in imports_of(name, path, modules) if target != name})
        for name, path in modules.items()
    }
    visiting, done, cycles = [], set(), []

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(visiting[visiting.index(node) :] + [node])
            return
        visiting.append(node)
        for target in graph[node]:
            visit(target)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_private_name_is_imported_from_another_module():
    modules = package_modules()
    private = [
        f"{name} imports {source}.{imported}"
        for name, path in modules.items()
        for source, names in imports_of(name, path, modules)
        for imported in names
        if imported.startswith("_")
    ]
    assert not private, "private names crossing modules: " + "; ".join(private)


def test_each_part_imports_only_the_parts_below_it():
    modules = package_modules()
    wrong = []
    for name, path in modules.items():
        part = max((part for part in LAYERS if within(name, part)), key=len)
        if part == "rmt_scale" and name != "rmt_scale":
            wrong.append(f"{name} is in no part of LAYERS")
        wrong += [
            f"{name} imports {target}"
            for target, _ in imports_of(name, path, modules)
            if not any(within(target, allowed) for allowed in LAYERS[part])
        ]
    assert not wrong, "imports against the layering: " + "; ".join(sorted(set(wrong)))


def test_deepspeed_is_imported_only_where_it_runs():
    wrong = [
        f"{name} imports {module}"
        for name, path in package_modules().items()
        for module in absolute_imports(path)
        if within(module, "deepspeed") and not any(within(name, user) for user in DEEPSPEED_USERS)
    ]
    assert not wrong, "DeepSpeed outside DEEPSPEED_USERS: " + "; ".join(sorted(set(wrong)))


def test_the_checker_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    """The detector itself: a cycle closed by a function-local relative import is found."""
    package = tmp_path / "rmt_scale"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from .b import thing\n")
    (package / "sub" / "b.py").write_text("def thing():\n    from . import a\n    from .a import _hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    modules = package_modules()
    assert [t for t, _ in imports_of("rmt_scale.sub.b", modules["rmt_scale.sub.b"], modules)] == [
        "rmt_scale.sub.a",
        "rmt_scale.sub.a",
    ]
    with pytest.raises(AssertionError, match="rmt_scale.sub.a -> rmt_scale.sub.b -> rmt_scale.sub.a"):
        test_the_package_has_no_import_cycle()
    with pytest.raises(AssertionError, match=r"rmt_scale.sub.b imports rmt_scale.sub.a._hidden"):
        test_no_private_name_is_imported_from_another_module()


def test_the_layering_checks_name_the_offending_import(tmp_path, monkeypatch):
    """The layering and DeepSpeed checks themselves, on function-local imports of a small package."""
    package = tmp_path / "rmt_scale"
    for part in ("model", "training", "extra"):
        (package / part).mkdir(parents=True)
        (package / part / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "model" / "steps.py").write_text(
        "def step():\n    from ..training import trainer\n    import deepspeed.comm\n"
    )
    (package / "training" / "trainer.py").write_text("from .. import model\nimport deepspeed\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with pytest.raises(
        AssertionError,
        match=r"layering: rmt_scale.extra is in no part of LAYERS; "
        r"rmt_scale.model.steps imports rmt_scale.training.trainer\n",
    ):
        test_each_part_imports_only_the_parts_below_it()
    with pytest.raises(AssertionError, match=r"DEEPSPEED_USERS: rmt_scale.model.steps imports deepspeed.comm\n"):
        test_deepspeed_is_imported_only_where_it_runs()
