"""The package's layers point one way: config and plan < data < models < runs < train < evaluate, tokens,
ops, bench < cli. A module imports from its own package or a lower layer, never a higher one (function-level
imports count too: they are arrows all the same), the packages of one layer import each other without a
cycle, and the package root holds packages plus plan.py only (config is a package of its own: the config
stays one unit, the lowest layer beside plan)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Lowest first. The root's entry points (__init__: the lazy `from pipeline import Tokenizer`; __main__:
# `python -m pipeline`) sit above every layer; a bare `import pipeline` (for __version__) imports only them.
LAYERS: list[set[str]] = [{"config", "plan"}, {"data"}, {"models"}, {"runs"}, {"train"},
                          {"evaluate", "tokens", "ops", "bench"}, {"cli"}]
ROOT_MODULES = {"__init__", "__main__", "plan"}

# Known upward arrows, each one module to one module; none today. (The benches raise BenchError, which the
# CLI turns into its one error path, pipeline.cli.common.fail.)
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _layer(unit: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if unit in layer), None)


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The layer unit of a module name: its package under pipeline/, or a root module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_between_units(package: Path = PACKAGE) -> list[tuple[str, str, str]]:
    """(importing module, imported module, where) for every import that crosses from one unit to another."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        if module in ("pipeline", "pipeline.__main__"):
            continue  # the root's entry points
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = ([f"pipeline.{alias.name}" for alias in node.names] if node.module == "pipeline"
                           else [node.module])
            else:
                continue
            for target in targets:
                if target.startswith("pipeline.") and _unit(target) != _unit(module):
                    found.append((module, target, f"{path.relative_to(package.parent)}:{node.lineno}"))
    return found


def layer_violations(package: Path = PACKAGE) -> list[str]:
    """Every import into a higher layer or into a unit no layer names, and every cycle between units."""
    problems, arrows = [], {}
    for module, target, where in imports_between_units(package):
        source, dest = _unit(module), _unit(target)
        if _layer(source) is None or _layer(dest) is None:
            problems.append(f"{where}: {module} -> {target}: add {source if _layer(source) is None else dest!r} "
                            "to a layer in tests/test_layers.py")
        elif _layer(dest) > _layer(source) and (module, target) not in ALLOWED_UPWARD:
            problems.append(f"{where}: {module} -> {target} points up ({source} is below {dest})")
        elif _layer(dest) == _layer(source):
            arrows.setdefault(source, set()).add(dest)
    problems += [f"import cycle between packages: {' -> '.join(cycle)}" for cycle in _cycles(arrows)]
    return problems


def _cycles(arrows: dict[str, set[str]]) -> list[list[str]]:
    cycles = []

    def visit(unit: str, path: list[str]) -> None:
        for dest in sorted(arrows.get(unit, ())):
            if dest == path[0]:
                cycles.append([*path, dest])
            elif dest not in path and dest > path[0]:  # each cycle once, from its smallest unit
                visit(dest, [*path, dest])

    for unit in sorted(arrows):
        visit(unit, [unit])
    return cycles


def test_no_import_points_up_or_closes_a_cycle() -> None:
    assert layer_violations() == []


def test_the_known_upward_arrows_still_exist() -> None:
    """An allowed exception that no longer exists is taken off the list, so it cannot come back unseen."""
    found = {(module, target) for module, target, _ in imports_between_units()}
    assert ALLOWED_UPWARD <= found


def test_the_root_holds_packages_and_plan() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert modules == ROOT_MODULES
    assert packages == set().union(*LAYERS) - {"plan"}


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The check itself: a data module that imports the CLI, and two peers that import each other."""
    for name, text in {"data/__init__.py": "", "data/bad.py": "def f():\n    from pipeline.cli import main\n",
                       "cli/__init__.py": "", "ops/__init__.py": "from pipeline.bench import x\n",
                       "bench/__init__.py": "from pipeline.ops import y\n"}.items():
        path = tmp_path / "pipeline" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    problems = layer_violations(tmp_path / "pipeline")
    assert any("pipeline.data.bad -> pipeline.cli points up" in p for p in problems), problems
    assert any(p.startswith("import cycle between packages: bench -> ops -> bench") for p in problems), problems
