"""Setting up a run on a loaded model: the steps between configs and training or scoring that the CLI, the demo and
the examples share, so each is written (and checked) once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import artifact
from .config import PLACEHOLDER, TaskConfig, TrainConfig
from .data import Task
from .errors import SoftPromptError
from .models import context_size

if TYPE_CHECKING:
    from .backbones import Backbone
    from .methods import PromptMethod


def template_init_text(template: str) -> str:
    """The literal words of a template (placeholders dropped), the default text for `init=text`: the prompt starts
    as the task's own wording. "Answer:" where the template is placeholders only."""
    return " ".join(PLACEHOLDER.sub(" ", template).split()) or "Answer:"


def fitted_task(config: TaskConfig, backbone: Backbone, virtual_tokens: int = 0,
                max_length: int = TrainConfig.max_length, too_long: str = TrainConfig.too_long) -> Task:  # fmt: skip
    """`config` bound to `backbone`'s tokenizer, its max_length capped to the model's context less the
    `virtual_tokens` a prompt takes: a longer example would run past the positions the model has."""
    return Task(config, backbone.tokenizer, max_length, too_long=too_long, context=context_size(backbone.model),
                virtual_tokens=virtual_tokens)  # fmt: skip


def check_generation_fits(backbone: Backbone, texts: list[str], ids: list[list[int]], virtual_tokens: int,
                          max_new_tokens: int) -> None:  # fmt: skip
    """Refuse inputs (`texts`, tokenized as `ids`) that, after `virtual_tokens` and with `max_new_tokens` generated,
    would run past the model's context: positions beyond it have no trained embedding."""
    context = context_size(backbone.model)
    over = [f"{t!r} ({len(i)} tokens)" for t, i in zip(texts, ids)
            if context and virtual_tokens + len(i) + max_new_tokens > context]  # fmt: skip
    if over:
        raise SoftPromptError(f"Longer than the model's context of {context} positions with {virtual_tokens} virtual "
                              f"tokens and --max-new-tokens {max_new_tokens}: {', '.join(over)}; shorten them or "
                              "generate less.")  # fmt: skip


def transfer_source(prompt_dir: str | Path, backbone: Backbone, where: str | None = None) -> PromptMethod:
    """The trained prompt in `prompt_dir` as the start of a new training (transfer, SPoT): pass it to `train` as
    `init_method`, with its `.config`, since its method and length replace the configured ones. A prompt trained on
    another base model is refused (`where` names it in that message): it would load but start from nonsense."""
    return artifact.attach(artifact.load(prompt_dir), backbone, where or f"the source prompt {prompt_dir}")
