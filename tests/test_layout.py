"""The package's layout: subpackages in layers (oml/__init__.py), no module importing a higher layer, no flat module
left at the top but the `oml` command's dispatcher."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "oml"
LAYERS = ["core", "make", "measure", "embed", "attack", "verify", "lab", "commands"]


def oml_imports(path):
    """(line, module) of every oml.* import in a file (absolute, or relative resolved against its package)."""
    package = ["oml", *path.relative_to(PACKAGE).parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = (
                    [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
                )
            else:
                names = [node.module] if node.module else []
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        yield from ((node.lineno, name) for name in names if name.split(".")[0] == "oml")


def test_every_module_lives_in_a_layer():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "cli.py"))
    assert flat == [], f"modules outside the subpackages: {flat}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").read_text().startswith('"""'), f"{layer} says what it holds"


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_from_a_higher_layer(layer):
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, name in oml_imports(path):
            target = name.split(".")[1] if "." in name else None
            if target in LAYERS and LAYERS.index(target) > LAYERS.index(layer):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_module_names_are_unique_and_say_what_they_hold():
    modules = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    stems = [p.stem for p in modules if p.parent.name != "commands"]  # commands/ is named after the verbs
    assert len(stems) == len(set(stems)), sorted(s for s in stems if stems.count(s) > 1)
    for path in modules:
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring"
