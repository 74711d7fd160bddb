"""The package's layout, read from its source: no import cycles, and components never import recipes.

Every `import` in every module of icae/ counts, also the ones inside functions (a lazy import is still
a dependency), so a cycle cannot hide behind one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "icae"

# Who may import whom: a module imports only modules of its own layer or a lower one.
LAYERS = [
    ("icae.errors",),  # 0: the one exception type everything raises
    ("icae.core", "icae.testing"),  # 1: components: the model and the pure pieces it is built from
    ("icae.data", "icae.training"),  # 2: components that read data or drive transformers' Trainer
    ("icae.recipes",),  # 3: the workflows behind the commands
    ("icae.cli", "icae.__main__", "icae.pretrain", "icae"),  # 4: glue: the command line, the package's lazy exports
]
COMPONENTS = LAYERS[0] + LAYERS[1] + LAYERS[2]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer(name: str) -> int:
    for i, prefixes in reversed(list(enumerate(LAYERS))):  # "icae" itself last: it is a prefix of everything
        if any(name == p or (p != "icae" and name.startswith(p + ".")) for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {__file__}")


def imports_of(name: str) -> list[tuple[int, str]]:
    """(line, imported icae module) for every import statement of module `name`, resolved to a module file."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..core import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, alias.name) for alias in node.names]
        else:
            continue
        for module, attr in targets:
            if not within(module, ("icae",)):
                continue
            if attr is not None and f"{module}.{attr}" in MODULES:  # from icae.core import inference
                module = f"{module}.{attr}"
            found.append((node.lineno, module))
    return found


GRAPH = {name: sorted({target for _, target in imports_of(name) if target != name}) for name in MODULES}


def test_every_import_names_an_existing_module():
    """Catches an import left at an old path (`from icae.model import ICAE`), also inside a function."""
    stale = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target}"
             for name in MODULES for line, target in imports_of(name) if target not in MODULES]
    assert not stale, "\n".join(stale)


def test_no_import_cycles():
    cycles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(name, path):
        state[name] = 1
        for target in GRAPH[name]:
            if target not in MODULES:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_components_never_import_recipes():
    wrong = [f"{name} imports {target}" for name, targets in GRAPH.items() if within(name, COMPONENTS)
             for target in targets if within(target, ("icae.recipes", "icae.cli", "icae.__main__", "icae.pretrain"))]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    upward = [f"{target} (layer {layer(target)})" for target in GRAPH[name]
              if target in MODULES and layer(target) > layer(name)]
    assert not upward, f"{name} (layer {layer(name)}) imports " + ", ".join(upward)


def test_the_graph_is_read_correctly():
    """The walk sees what it should, so that the tests above cannot pass by seeing nothing."""
    assert "icae.core.inference" in GRAPH["icae.core.model"]  # `from icae.core import inference`
    assert "icae.core.model" in GRAPH["icae"]  # inside the package's lazy __getattr__
    assert "icae.core.base_model" in GRAPH["icae.data.tokens"]  # inside a function
    assert "icae.core.model" not in GRAPH["icae.core.inference"]  # the module and its decode loop: one way only
    assert {"icae.recipes.pretrain", "icae.recipes.use", "icae.recipes.layout"} <= set(MODULES)


def names_imported_from(name: str, module: str) -> list[tuple[int, str]]:
    """(line, name) for every `from MODULE import NAME` in module `name` (also inside functions)."""
    path = MODULES[name]
    return [(node.lineno, alias.name) for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.ImportFrom) and node.module == module for alias in node.names]


def test_recipes_share_run_plumbing_through_training_not_each_other():
    """What the training recipes share lives in icae.training; another recipe may run their `main`, no more."""
    wrong = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target}.{attr}"
             for name in MODULES for target in ("icae.recipes.pretrain", "icae.recipes.finetune") if name != target
             for line, attr in names_imported_from(name, target) if attr != "main"]
    assert not wrong, "\n".join(wrong)
    assert not [t for t in GRAPH["icae.recipes.finetune"] if t == "icae.recipes.pretrain"]
    assert "icae.training.run" in GRAPH["icae.recipes.pretrain"] and "icae.training.run" in GRAPH["icae.recipes.finetune"]


def test_every_command_is_a_recipe_module_with_main():
    """The command table's promise: `icae X` is a module in icae/recipes/ with main(argv)."""
    from icae.cli import COMMANDS

    for command, (module, _) in COMMANDS.items():
        assert within(module, ("icae.recipes",)) and module in MODULES, f"icae {command}: {module}"
        tree = ast.parse(MODULES[module].read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), module


def test_data_and_training_do_not_import_each_other():
    """docs/ARCHITECTURE.md's table: data and training both stand on core alone."""
    wrong = [f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
             for a, b in (("icae.data", "icae.training"), ("icae.training", "icae.data"))
             if within(name, (a,)) and within(target, (b,))]
    assert not wrong, "\n".join(wrong)
