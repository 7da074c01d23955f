"""The model every benchmark loads, and the prompts they start from."""

from __future__ import annotations

import torch

EMBEDDED = "smollm2-135m"


def embedded_backbone(page_in: bool = False, dtype: str = "float32", device: str = "cpu"):
    """The embedded SmolLM2-135M (float32 on the CPU unless told) as a frozen backbone. `page_in` reads every weight
    once: they are memory-mapped from disk, and a first measured step would otherwise count them in its peak
    memory."""
    from softprompt.backbones import backbone_for
    from softprompt.models import LoadConfig, load_model

    backbone = backbone_for(*load_model(EMBEDDED, LoadConfig(dtype=dtype, device=device)))
    if page_in:
        with torch.no_grad():
            sum(float(p.sum()) for p in backbone.model.parameters())
    return backbone


def vocab_prompt(backbone, method: str, num_tokens: int, seed: int):
    """A fresh prompt of `method` with `init="vocab"` (embeddings of, or the frozen model's key/values over, real
    tokens drawn with `seed`): random but realistic values, the same for every library and every run."""
    from softprompt import methods
    from softprompt.config import PromptConfig

    torch.manual_seed(seed)
    config = PromptConfig(method=method, num_tokens=num_tokens, init="vocab")
    return methods.build(config, backbone, generator=torch.Generator().manual_seed(seed))
