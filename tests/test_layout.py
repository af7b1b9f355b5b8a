"""The architecture, checked: one package per concept with imports pointing down, small modules and
functions, no private names shared across modules, and merge methods listed only by their registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from warpkit.merge import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "warpkit"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# Which warpkit packages each part may import (besides itself). Entry points on top, `_util` at the bottom.
LAYERS: dict[str, set[str]] = {
    "_util": set(),
    "testing": {"_util"},
    "workloads": {"_util", "testing"},
    "merge": {"_util"},
    "anchor": {"_util"},
    "frontier": {"_util", "workloads", "merge"},
    "forget": {"_util", "workloads", "merge", "frontier"},
    "loop": {"_util", "workloads", "merge", "anchor", "frontier"},
    "cli": {"_util", "testing", "workloads", "merge", "frontier", "forget", "loop"},
    "default": {"workloads"},  # the old name of warpkit.workloads.default, kept for existing configs
    "__init__": set(),  # lazy: names modules as strings only
}
# A method's name may appear in its registry entry and in the modules that implement its kind; anywhere
# else only with a reason here (no other list of methods by hand).
IMPLEMENTATIONS = {
    "coefficient": {"merge/coefficients.py", "merge/math.py"},  # the rules, and SLERP / LERP in memory
    "elementwise": {"merge/elementwise.py"},
    "whole-model": {"merge/soups.py"},
}
METHOD_NAME_USES = {
    **{
        ("__init__.py", n): "public function names (warpkit.slerp, ...)"
        for n in ("slerp", "lerp", "greedy_soup", "warm")
    },
    **{("merge/__init__.py", n): "public function names in __all__" for n in ("slerp", "lerp")},
    ("merge/soups.py", "linear"): "a soup is the linear average (its implementation)",
    ("merge/folders.py", "lerp"): "LITI is the LERP of the single model merged (its implementation)",
    ("loop/config.py", "slerp"): "the default merge_method of a WARP config (the paper's)",
    ("cli.py", "slerp"): "the default --method (the paper's)",
    # Other concepts that share a word with a method:
    **{(f, "linear"): "a plot axis scale (plot_xscale)" for f in ("frontier/config.py", "frontier/plot.py")},
    **{
        (f, "soup"): "the frontier's rewarded-soup policy kind (a weight sweep), not the merge method"
        for f in ("frontier/plot.py", "frontier/policies.py")
    },
    ("frontier/scorer.py", "soup"): "the frontier method label of a greedy-soup candidate",
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "__init__"


def _warpkit_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("warpkit"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("warpkit")]
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_fit_on_a_screen(path):
    tree = ast.parse(path.read_text())
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    part = _part(path)
    allowed = LAYERS[part] | {part}
    for module, names in _warpkit_imports(ast.parse(path.read_text())):
        target = module.split(".")[1] if "." in module else "__init__"
        if target == "__init__" and names == ["__version__"]:
            continue  # the package version, from the root
        assert target in allowed, f"{path.relative_to(PACKAGE)} imports {module} ({part} -> {target})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_crosses_modules(path):
    for module, names in _warpkit_imports(ast.parse(path.read_text())):
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        assert private == [], f"{path.relative_to(PACKAGE)} imports {private} from {module}"


def test_merge_methods_are_listed_only_by_the_registry():
    uses = {}
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "merge/methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in METHODS:
                uses.setdefault((rel, node.value), node.lineno)
    unexpected = {
        (rel, name): line
        for (rel, name), line in uses.items()
        if (rel, name) not in METHOD_NAME_USES and rel not in IMPLEMENTATIONS[METHODS[name].kind]
    }
    assert unexpected == {}, "method names written outside the registry (file, name): line"
    assert set(METHOD_NAME_USES) <= set(uses), "stale allowance in METHOD_NAME_USES"


def test_the_readme_tree_names_every_module():
    """README's Layout block lists each module under its package (a new module without a line fails here)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    sections: dict[str, str] = {}
    package = ""
    for line in block.splitlines():
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("    ") and stripped.split(" ")[0].endswith("/"):
            package = stripped.split(" ")[0].rstrip("/")
        elif not line.startswith(" "):
            package = "<top>"
        sections[package] = sections.get(package, "") + line + "\n"
    missing = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if path.name == "__init__.py" or rel.parts[0] == "_util":
            continue  # packages are described as a whole; _util by its chores
        where = rel.parts[0] if len(rel.parts) > 1 else "warpkit"
        text = sections.get(where, "") if len(rel.parts) > 1 else block
        if path.name not in text:
            missing.append(str(rel))
    assert missing == [], f"README's Layout does not name {missing}"
