"""Prompt methods. Each owns its parameters, its initialization and `kv()`; a registry maps names to classes."""

from .base import PromptMethod, demo_key, demonstrations, demonstrations_length
from .prefix_tuning import Prefix
from .prompt_tuning import SoftPrompt

REGISTRY: dict[str, type[PromptMethod]] = {SoftPrompt.name: SoftPrompt, Prefix.name: Prefix}


def build(config, backbone, labels=(), generator=None, examples=None) -> PromptMethod:
    """A freshly initialized method for `config` on `backbone`; init=demos draws its demonstrations from the
    training `examples` (`data.Example`s) and remembers where each one went (`demo_slots`). A length or init left
    unset takes the start of a task of unknown kind (`PromptConfig.for_tasks`: training resolves it by its tasks)."""
    config = config.for_tasks([])
    demo_ids, slots = None, {}
    if config.init == "demos" and examples:
        demo_ids, slots = demonstrations(examples, backbone.tokenizer, config.num_tokens, generator)
    method = REGISTRY[config.method].create(config, backbone, list(labels), generator, demo_ids)
    method.demo_slots = slots
    return method


def from_tensors(config, backbone, tensors: dict) -> PromptMethod:
    """A method restored from saved tensors (an artifact or a checkpoint)."""
    return REGISTRY[config.method].from_tensors(config, backbone, tensors)


__all__ = ["PromptMethod", "demo_key", "demonstrations_length", "SoftPrompt", "Prefix", "REGISTRY", "build",
           "from_tensors"]
