"""The package's shape, as ARCHITECTURE.md draws it, checked on the source: which wing may import which, no import
cycle, transformers' cache and mask internals touched only in backbones/, no method-name switch outside methods/,
no `_private` name imported from another module, short functions, a small top level."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "softprompt"

LAYERS = [
    {"errors", "atomic", "softprompt"},  # the root package's module holds only __version__ and a lazy door
    {"models", "methods"},
    {"backbones", "config"},
    {"artifact", "data"},
    {"scoring"},
    {"training", "serve"},
    {"prepare"},
    {"tuner", "demo"},
    {"cli"},
    {"__main__"},
]
"""A wing imports its own modules and wings of lower layers only: never a sibling (training and serve know nothing
of each other) nor anything above. The root module is exempt as an importer (its lazy `PromptTuner`)."""
LAYER = {wing: i for i, wings in enumerate(LAYERS) for wing in wings}
CACHE_AND_MASKS = ("cache_utils", "masking_utils", "attn_mask", "Cache")
"""Parts of transformers that change between releases; backbones/ is the one place that touches them."""
METHOD_NAMES = {"prompt", "prefix"}
MAX_FUNCTION_LINES = 120
MAX_TOP_LEVEL = 12


class Module:
    def __init__(self, path: Path):
        self.path = path
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        self.is_package = parts[-1] == "__init__"
        self.name = ".".join(parts[:-1] if self.is_package else parts)  # softprompt.training.loop
        self.tree = ast.parse(path.read_text())

    @property
    def wing(self) -> str:
        return wing_of(self.name)

    def imports(self, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
        """(absolute module, names, line) of each import of a softprompt module."""
        package = self.name if self.is_package else self.name.rsplit(".", 1)[0]
        nodes = self.tree.body if top_level_only else ast.walk(self.tree)
        found = []
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] == "softprompt":
                    found.append((module, [a.name for a in node.names], node.lineno))
            elif isinstance(node, ast.Import):
                found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "softprompt"]
        return found


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "softprompt"


MODULES = [Module(p) for p in sorted(PACKAGE.rglob("*.py"))]
BY_NAME = {m.name: m for m in MODULES}


def targets(module: str, names: list[str]) -> list[str]:
    """The modules an import reaches: `from pkg import mod` names a module, `from mod import x` the module itself."""
    reached = [f"{module}.{n}" for n in names if f"{module}.{n}" in BY_NAME]
    return reached if reached and len(reached) == len(names) else [module, *reached]


def test_wings_import_only_lower_layers():
    assert {m.wing for m in MODULES} <= set(LAYER), f"wings without a layer: {({m.wing for m in MODULES}) - set(LAYER)}"
    wrong = []
    for m in MODULES:
        if m.name == "softprompt":
            continue
        for module, names, line in m.imports():
            for target in targets(module, names):
                other = wing_of(target)
                if other != m.wing and LAYER[other] >= LAYER[m.wing]:
                    wrong.append(f"{m.path.relative_to(PACKAGE)}:{line} ({m.wing}, layer {LAYER[m.wing]}) imports "
                                 f"{target} ({other}, layer {LAYER[other]})")  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = defaultdict(set)
    for m in MODULES:
        for module, names, _ in m.imports(top_level_only=True):
            graph[m.name] |= {t for t in targets(module, names) if t in BY_NAME and t != m.name}
    state, stack = {}, []

    def visit(node: str) -> None:  # depth-first; a node met again while on the stack closes a cycle
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(BY_NAME):
        if name not in state:
            visit(name)


def test_caches_and_masks_only_in_backbones():
    wrong = []
    for m in MODULES:
        if m.wing == "backbones":
            continue
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
                touched = [x for x in [node.module, *(a.name for a in node.names)] if any(k in x for k in CACHE_AND_MASKS)]
                if touched:
                    wrong.append(f"{m.path.relative_to(PACKAGE)}:{node.lineno} imports {', '.join(touched)}")
    assert not wrong, "\n".join(wrong)


def test_no_method_name_switch_outside_methods():
    """A method is asked what it can do (methods/), never compared with its name."""
    wrong = []
    for m in MODULES:
        if m.wing == "methods":
            continue
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if METHOD_NAMES & set(c for c in constants if isinstance(c, str)):
                    wrong.append(f"{m.path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_imported_from_another_module():
    wrong = [f"{m.path.relative_to(PACKAGE)}:{line} imports {name} from {module}"
             for m in MODULES for module, names, line in m.imports() for name in names
             if name.startswith("_") and not name.startswith("__")]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_functions_stay_short():
    long = [f"{m.path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for m in MODULES for node in ast.walk(m.tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]  # fmt: skip
    assert not long, "\n".join(long)


def test_a_small_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules at the top level: {top}"
