"""The house rules of docs/architecture.md, checked on the source: each module imports only from
its own layer or the layers below it; routetune modules are imported at the top of a module
(except in the CLI, which loads torch only after a config has been validated); no file over 420
lines, no function over 60."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "routetune"

LAYERS = [  # bottom first
    (
        "__init__",
        "__version__",
        "errors",
        "files",
        "seeds",
        "run_paths",
        "run_folder",
        "hub",
        "logs",
        "objectives",
        "config",
        "device",
    ),
    ("data",),
    ("model",),
    ("evaluate",),
    ("training",),
    ("runs", "export", "lifecycle", "workflow", "continual", "sweep"),
    ("serve", "reports"),
    ("cli", "api", "__main__"),
]


def _layer(module: str) -> int:
    head = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module}: not placed in a layer (tests/test_layers.py LAYERS, docs/architecture.md)")


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def _imports(tree):
    """(imported routetune module, inside a function?) for every import of the tree."""
    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            deeper = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("routetune"):
                targets = (
                    [child.module] if child.module != "routetune" else [f"routetune.{a.name}" for a in child.names]
                )
                for t in targets:
                    yield t, inside
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("routetune."):
                        yield a.name, inside
            yield from walk(child, deeper)
    yield from walk(tree, False)


LAZY = {("routetune", "routetune.api"),  # `import routetune` stays light; routetune.train loads the API
        ("routetune.config.docs", "routetune.model.methods")}  # the docs list the registered methods


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{name} -> {target}" for name, _, tree in _modules() for target, _ in _imports(tree)
              if _layer(target) > _layer(name) and (name, target) not in LAZY]
    assert not upward, upward


def test_routetune_imports_sit_at_the_top_of_modules():
    hidden = [f"{name} -> {target}" for name, _, tree in _modules() for target, inside in _imports(tree)
              if inside and not name.startswith("routetune.cli")
              and (name, target) not in LAZY]
    assert not hidden, hidden


def test_files_and_functions_stay_small():
    big = [f"{p.name}: {n} lines" for _, p, _ in _modules() if (n := len(p.read_text().splitlines())) > 420]
    long = [f"{p.name}:{f.lineno} {f.name}: {f.end_lineno - f.lineno + 1} lines" for _, p, tree in _modules()
            for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and f.end_lineno - f.lineno + 1 > 60]
    assert not big and not long, big + long


def test_no_module_outside_the_methods_compares_method_names():
    """A method's behaviour is asked of its object (model/methods/), never decided by its name:
    no comparison of a `method` / `method.name` / `peft.method` with a string elsewhere."""
    def names_a_method(node) -> bool:
        return isinstance(node, ast.Attribute) and (
            node.attr == "method" or (node.attr == "name" and ast.unparse(node.value).endswith("method")))

    found = []
    for name, path, tree in _modules():
        if name.startswith("routetune.model.methods"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(names_a_method(s) for s in sides) and any(
                        isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
