"""The package's layers: each module imports only from its own layer or those below it (docs/
architecture.md draws them), every import counted, the ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import ruyi_quant

PACKAGE = Path(ruyi_quant.__file__).parent
# bottom to top; a module's layer is that of its first name below ruyi_quant
LAYERS = (
    ("__init__", "errors", "log", "names"),
    ("text", "model"),
    ("quant",),
    ("recipe",),
    ("store",),
    ("evaluate", "report"),
    ("sources",),
    ("exporters", "runtime"),
    ("preflight",),
    ("pipeline",),
    ("cli",),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def imports(path: Path) -> list[tuple[int, list[str]]]:
    """(line, the imported module's names below ruyi_quant) of every import of our own modules."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "ruyi_quant":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from .. import names` imports the module names
                root = [alias.name] if alias.name in LAYER else ["__init__"]  # or __version__
                out.append((node.lineno, target or root))
        elif isinstance(node, ast.Import):
            out += [
                (node.lineno, a.name.split(".")[1:])
                for a in node.names
                if a.name.split(".")[0] == "ruyi_quant"
            ]
    return out


def test_every_module_has_a_layer():
    tops = {module_name(p)[0] for p in PACKAGE.rglob("*.py")}
    assert tops - set(LAYER) == set(), "give these a layer in LAYERS (and docs/architecture.md)"


def test_no_import_reaches_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = LAYER[module_name(path)[0]]
        for line, target in imports(path):
            theirs = LAYER[target[0] if target else "__init__"]
            if theirs > mine:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {'.'.join(target)}")
    assert upward == []


def test_the_root_holds_at_most_ten_modules_and_none_is_over_450_lines():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 10, root
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert long == {}
