"""No tensor factory in src/ creates a tensor on an implicit device where a model tensor will meet it.

`torch.zeros(...)` and its kin put their tensor on the CPU unless told otherwise; on a GPU such a tensor meeting a
model's fails (or silently copies every step). The scan below reads every module of the package (its AST, no import)
and lists each factory call without a `device=` keyword; each must be in ALLOWED with the reason it is right on the
CPU, and ALLOWED holds nothing that is gone. A new call without a device therefore fails here until it passes one
(`device=<a model tensor>.device`) or is added to ALLOWED with its reason. `*_like` and `Tensor.new_*` take their
device from a tensor and are not factories in this sense.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "softprompt"

FACTORIES = {"zeros", "ones", "empty", "full", "arange", "range", "tensor", "as_tensor", "rand", "randn", "randint",
             "randperm", "eye", "linspace", "logspace", "normal", "empty_strided", "sparse_coo_tensor"}  # fmt: skip
"""`torch.<name>(...)` calls that make a new tensor on the default device unless given `device=`."""

ALLOWED: dict[tuple[str, str, str], str] = {
    # (module, enclosing function, factory): why the CPU is right there (one entry per call)
    ("backbones/head.py", "check_head", "tensor"): "the probe's scales, drawn on the CPU then moved with the probe",
    ("backbones/head.py", "check_head", "randn"): "a CPU-seeded probe (the same on every device), then `.to(device)`",
    ("methods/base.py", "initial_token_ids", "tensor"): "a pool of token ids, read back as a Python list",
    ("methods/base.py", "initial_token_ids", "randperm"): "a CPU-seeded draw of token ids, read back as a list",
    ("methods/base.py", "demonstrations", "randperm"): "a CPU-seeded order of training examples, read back as a list",
    ("methods/prefix_tuning.py", "Prefix.__init__", "empty"): "a parameter built on the CPU; `create`/`from_tensors` "
                                                              "move the module to the model's device",
    ("methods/prefix_tuning.py", "Prefix.__init__", "zeros"): "the same: a parameter, moved with its module",
    ("methods/prefix_tuning.py", "Prefix.create", "rand"): "a CPU-seeded init (the same prefix on every device), "
                                                           "moved with the module",
    ("methods/prompt_tuning.py", "SoftPrompt.create", "rand"): "a CPU-seeded init, moved with the module",
    ("data/batches.py", "collate", "full"): "a batch is built on the CPU and moved whole by its users (`Batch.to`)",
    ("data/batches.py", "collate", "zeros"): "the same batch",
    ("data/batches.py", "collate", "tensor"): "the same batch (a row's ids)",
    ("data/batches.py", "collate.<lambda>", "tensor"): "the same batch (its loss indices)",
    ("scoring/mixed.py", "label_scores_mixed", "zeros"): "the empty result beside results already on the CPU",
    ("training/memory.py", "_element_size", "empty"): "a 0-d probe of a dtype's byte size, never used as data",
    ("training/loop.py", "BatchOrder.__getitem__", "randperm"): "the data order: CPU-seeded, the same in every "
                                                                "process, read back as a list",
    ("artifact/inspection.py", "describe", "eye"): "an artifact's tensors, which are always on the CPU",
    ("artifact/inspection.py", "heatmap", "as_tensor"): "a matrix for a plot, turned into numpy at once",
    ("serve/vllm_embeds.py", "InputEmbeddings.embed", "tensor"): "indices into the table (CPU indices index a "
                                                                 "table on any device)",
    ("serve/engines/vllm.py", "VllmEngine._score", "tensor"): "label scores read from vLLM's JSON answer; no "
                                                                  "model tensor on this side",
}


def _qualname(stack: list[ast.AST]) -> str:
    names = [n.name if not isinstance(n, ast.Lambda) else "<lambda>" for n in stack
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]  # fmt: skip
    return ".".join(names) or "<module>"


def implicit_device_calls(source: str) -> list[tuple[str, str, int]]:
    """(enclosing function, factory, line) of each `torch.<factory>(...)` call in `source` without `device=`."""
    found = []

    def visit(node: ast.AST, stack: list[ast.AST]) -> None:
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "torch"
                    and func.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords)):  # fmt: skip
                found.append((_qualname(stack), func.attr, node.lineno))
        inner = stack + [node] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                    ast.Lambda)) else stack  # fmt: skip
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), [])
    return found


def scan() -> dict[tuple[str, str, str], list[int]]:
    """Every implicit-device factory call in the package: (module, function, factory) -> its lines."""
    calls: dict[tuple[str, str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        for function, factory, line in implicit_device_calls(path.read_text(encoding="utf-8")):
            calls.setdefault((module, function, factory), []).append(line)
    return calls


def test_no_new_factory_call_on_an_implicit_device():
    found = scan()
    counts = Counter({key: len(lines) for key, lines in found.items()})
    new = {key: lines for key, lines in found.items() if counts[key] > (key in ALLOWED)}
    assert not new, (
        "tensor factories without device= (pass `device=<a model tensor>.device`, or add the call to ALLOWED with "
        "the reason the CPU is right): "
        + "; ".join(f"src/softprompt/{m} line(s) {lines} in {f}: torch.{name}" for (m, f, name), lines in new.items())
    )
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"ALLOWED lists calls that are gone (remove them): {stale}"


def test_the_scan_finds_what_it_must_and_nothing_else():
    """The checker itself, on a made-up module: calls without a device are found, with their place; calls with one,
    `*_like`, `new_*` and non-torch functions are not."""
    source = (
        "import torch\n"
        "class A:\n"
        "    def f(self, x):\n"
        "        a = torch.zeros(3)\n"
        "        b = torch.zeros(3, device=x.device)\n"
        "        c = torch.zeros_like(x) + x.new_ones(3)\n"
        "        g = lambda n: torch.arange(n)\n"
        "        return torch.tensor([1, 2], dtype=torch.long)\n"
        "def h(np):\n"
        "    return np.zeros(3)\n"
    )  # fmt: skip
    assert implicit_device_calls(source) == [("A.f", "zeros", 4), ("A.f.<lambda>", "arange", 7), ("A.f", "tensor", 8)]
