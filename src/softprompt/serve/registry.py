"""The prompts a server offers: each artifact directory under the prompts folder is one model id (its directory
name), next to the bare base model. Each prompt's input (its per-layer K/V for our engine, its soft tokens in front
of vLLM: `ServedModel.prompt_input`) is computed once when it is loaded, so a request never re-runs its soft prompt;
`reload` picks up new, changed and removed directories without a restart."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import artifact
from ..backbones import Backbone
from ..config import TaskConfig
from ..data import TaskEncoder
from ..errors import SoftPromptError
from .served import ServedModel, as_served


@dataclass
class Prompt:
    """One servable model id."""

    name: str
    prompt_input: torch.Tensor | None
    """What the served model made of the artifact, computed once: the K/V prefix (num_layers, 2, kv_heads, n,
    head_dim) for our engine, the soft tokens (n, hidden) in front of vLLM; None for the bare base model."""
    task: TaskConfig | None = None
    """The artifact's template and labels; None for the bare base model."""
    label_ids: list[list[int]] = field(default_factory=list)
    """Token ids of each label word (classification prompts)."""
    method: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    signature: tuple = ()
    """Sizes and modification times of the artifact's files: a change means reload."""
    folder: Path | None = None
    """The artifact's directory; None for the bare base model."""

    @property
    def num_tokens(self) -> int:
        return 0 if self.prompt_input is None else self.prompt_input.shape[-2]

    @property
    def is_classification(self) -> bool:
        return self.task is not None and self.task.task == "classification"

    def format(self, text: str) -> str:
        """The text put into the prompt's template, as the prompt saw inputs in training (every {field} gets it: the
        server refuses templates of several fields)."""
        return self.task.fill_text(text) if self.task else text


def base_id(model_name: str) -> str:
    """The bare model's id: the name given, or a local folder's own name."""
    return Path(model_name).name if ("/" in model_name and Path(model_name).exists()) else model_name


def _signature(folder: Path) -> tuple:
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
             and p.name in (artifact.CONFIG, artifact.WEIGHTS)]  # fmt: skip
    return tuple(stats)


class Registry:
    """Model id -> Prompt. Reads may come from any thread: `reload` swaps in a new dict in one assignment."""

    def __init__(self, model: ServedModel | Backbone, base_name: str, prompts_dir: str | Path | None = None):
        """`model`: what turns an artifact into its prompt input (a bare backbone: our engine's)."""
        self.model = as_served(model)
        self.base = Prompt(base_id(base_name), None)
        self.prompts_dir = Path(prompts_dir) if prompts_dir else None  # ServeConfig checks that it is a folder
        self.prompts: dict[str, Prompt] = {self.base.name: self.base}
        self.reloading = threading.Lock()
        """Held by a reload: one at a time, whichever thread runs it (the engine's worker, or a thread of the vLLM
        front's), so two never load the same folders side by side nor swap in each other's half."""

    def get(self, name: str) -> Prompt | None:
        return self.prompts.get(name)

    def __len__(self) -> int:
        return len(self.prompts) - 1  # prompts, not counting the base model

    def _load(self, folder: Path) -> Prompt:
        saved = artifact.load(folder)
        with torch.no_grad():
            prompt_input = self.model.prompt_input(saved, str(folder))
        labels = TaskEncoder(saved.task, self.model.tokenizer).label_ids if saved.task.task == "classification" else []
        return Prompt(folder.name, prompt_input, saved.task, labels, saved.prompt.method, signature=_signature(folder),
                      folder=folder)  # fmt: skip

    def unchanged(self, prompt: Prompt) -> bool:
        """Whether `prompt`'s files on disk are still the version loaded (False for the bare base model, and for a
        folder that went away)."""
        if prompt.folder is None:
            return False
        try:
            return _signature(prompt.folder) == prompt.signature
        except OSError:
            return False

    def reload(self, strict: bool = False) -> dict:
        """Load new and changed prompt directories, drop removed ones. A broken directory keeps its previous version
        (if any) and is reported; with `strict` (at startup) it is an error instead. One reload at a time."""
        with self.reloading:
            return self._reload(strict)

    def _reload(self, strict: bool) -> dict:
        report = {"loaded": [], "unloaded": [], "unchanged": [], "errors": {}}
        if self.prompts_dir is None:
            return report
        if not self.prompts_dir.is_dir():  # moved away while serving: keep what is loaded
            message = f"the prompts folder {self.prompts_dir} is not a directory (any more); nothing was reloaded"
            if strict:
                raise SoftPromptError(message)
            report["errors"][str(self.prompts_dir)] = message
            return report
        current = {self.base.name: self.base}
        folders = sorted(p for p in self.prompts_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in folders:
            if not any((folder / name).is_file() for name in (artifact.CONFIG, artifact.WEIGHTS)):
                continue  # not an artifact (a plain subfolder)
            name, old = folder.name, self.prompts.get(folder.name)
            if name == self.base.name:
                report["errors"][name] = f"the prompt directory {folder} has the base model's name {name!r}; rename it"
                continue
            if old is not None and old.signature == _signature(folder):
                current[name] = old
                report["unchanged"].append(name)
                continue
            try:
                current[name] = self._load(folder)
                report["loaded"].append(name)
            except Exception as error:  # a broken artifact must not take the server down
                report["errors"][name] = str(error) if isinstance(error, SoftPromptError) else repr(error)
                if old is not None:
                    current[name] = old
        report["unloaded"] = sorted(set(self.prompts) - set(current))
        if strict and report["errors"]:
            problems = "\n".join(f"  - {name}: {message}" for name, message in report["errors"].items())
            raise SoftPromptError(f"Cannot serve the prompts in {self.prompts_dir}:\n{problems}")
        self.prompts = current
        return report
