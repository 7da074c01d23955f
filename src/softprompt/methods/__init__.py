"""Prompt methods. Each owns its parameters, its initialization and `kv()`; a registry maps names to classes."""

from .base import PromptMethod
from .prefix_tuning import Prefix
from .prompt_tuning import SoftPrompt

REGISTRY: dict[str, type[PromptMethod]] = {SoftPrompt.name: SoftPrompt, Prefix.name: Prefix}


def build(config, backbone, labels=(), generator=None) -> PromptMethod:
    """A freshly initialized method for `config` on `backbone`."""
    return REGISTRY[config.method].create(config, backbone, list(labels), generator)


def from_tensors(config, backbone, tensors: dict) -> PromptMethod:
    """A method restored from saved tensors (an artifact or a checkpoint)."""
    return REGISTRY[config.method].from_tensors(config, backbone, tensors)


__all__ = ["PromptMethod", "SoftPrompt", "Prefix", "REGISTRY", "build", "from_tensors"]
