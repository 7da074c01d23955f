"""`--compile`: the frozen decoder's training pass compiled by torch.compile (inductor) as one graph over the whole
stack, so the norms, rotary embeddings, activations and their backwards run as fused kernels.

Only the pass `packed_forward` runs with gradients on is compiled. Validation, decoding and serving stay eager: each
new kind of call there (no gradients, one token per row, a cache to continue) would cost another graph of the whole
stack, minutes on a CPU. Shapes are dynamic, so packed rows of any width share a graph; the soft tokens in front of
the rows and a prefix in the cache are two graphs. Compiling only the parts of a layer that hold no cache index (its
norms and MLP; the attention specializes on its layer index, one graph per layer) was measured too: no faster.
"""

from __future__ import annotations

import torch


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (the difference over a run: its compilations)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compiler_problem(device: torch.device) -> str | None:
    """None when torch.compile works here (a small function compiled and run on `device`), else why not (on a CPU:
    no working C++ compiler, most often)."""
    try:
        torch.compile(_probe)(torch.ones(4, device=device))
    except Exception as error:  # noqa: BLE001  inductor fails in many ways (no compiler, codegen, a missing backend)
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    return None


def _probe(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sin() + 1
