"""Prompt-tuning artifacts as vLLM `prompt_embeds`: the model reads `[P; E]`, and that is exactly what vLLM's
prompt-embeds input feeds it, so a soft prompt is served by an unmodified vLLM (`vllm serve --enable-prompt-embeds`).

What the model's own forward would do to token embeddings must be done here: for the supported architectures
(`SUPPORTED`) that is the embedding table lookup alone, so `cat(P, table[ids])` is the input exactly. Prefix tuning
cannot be served this way: its key/values enter every layer, and vLLM takes inputs, not caches.

`InputEmbeddings` needs the tokenizer and the input-embedding table only (read from the weight files without
building the model), so a front costs a tokenizer and one matrix, whatever the model's size.

    from softprompt.serve.vllm_embeds import prompt_embeds, encode
    embeds = prompt_embeds("my-prompt", "A joyless, plodding mess.")   # (n + T, hidden): [P; E]
    client.completions.create(model=BASE, prompt=None, extra_body={"prompt_embeds": encode(embeds)}, ...)
"""

from __future__ import annotations

import base64
import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .. import artifact as artifacts
from .. import methods
from ..backbones import Shapes
from ..errors import SoftPromptError
from ..models import Fingerprint, LoadConfig, context_size, fingerprint_of, load_model, locate
from .served import ServedModel

SUPPORTED = ("llama", "qwen2", "qwen3")
"""Model types whose forward uses token embeddings as they are (no scaling), checked against vLLM in the tests."""


@dataclass
class InputEmbeddings(ServedModel):
    """A base model as a front to vLLM sees it: tokenizer, config and input-embedding table (vocab, hidden). As the
    served model, a prompt's input is its soft tokens, which vLLM reads in front of the rows' embeddings."""

    name: str
    path: str
    """Where it was read from: a folder, or a hub name."""
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    table: torch.Tensor
    fingerprint: Fingerprint
    """The base model's fingerprint, which artifacts record: of the values as the files hold them, whatever their
    dtype, so it matches the model loaded in any dtype (`models.Fingerprint`)."""

    @property
    def shapes(self) -> Shapes:
        return Shapes.of(self.config)

    @classmethod
    def load(cls, name_or_path: str) -> "InputEmbeddings":
        """The embedded short name, a local folder or a hub name, as `models.load_model` takes them."""
        path, local_only = locate(name_or_path)
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
        if config.model_type not in SUPPORTED:
            raise SoftPromptError(
                f"{name_or_path} is a {config.model_type!r} model; serving through vLLM's prompt_embeds is supported "
                f"for {', '.join(SUPPORTED)} (their forward takes token embeddings as they are). Serve it with "
                "softprompt's own engine: `softprompt serve` without --vllm-url."
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # as `load_model` does: the same ids either way
        tensors = _read_fingerprinted(Path(path), config) if Path(path).is_dir() else None
        if tensors is None:  # a hub name, or weights under other names than the model's: load it once
            model, _ = load_model(name_or_path, LoadConfig(dtype="float32", device="cpu"))  # vLLM runs it
            tensors = [model.get_input_embeddings().weight.detach(), *list(model.parameters())[-3:]]
        return cls(name_or_path, path, tokenizer, config, tensors[0].float(), fingerprint_of(tensors, as_stored=True))

    def embed(self, ids: list[int]) -> torch.Tensor:
        """(T, hidden) input embeddings of token ids."""
        return self.table[torch.tensor(ids, dtype=torch.long)]

    @property
    def context(self) -> int | None:
        return context_size(self.config)

    def vocabulary(self) -> tuple[torch.Tensor, PreTrainedTokenizerBase]:
        return self.table, self.tokenizer

    def prompt_input(self, saved: artifacts.Artifact, where: str = "the prompt") -> torch.Tensor:
        """The artifact's soft prompt P (n, hidden), checked to belong to this base model; a method whose vectors
        are not input embeddings (prefix tuning) is refused."""
        method = methods.REGISTRY[saved.prompt.method]
        if not method.in_embedding_space:
            raise SoftPromptError(
                f"{where} is a {saved.prompt.method}-tuning artifact: its key/values enter every attention layer, and "
                "vLLM takes input embeddings only, so it cannot serve it. Serve it with softprompt's own engine "
                "(`softprompt serve` without --vllm-url), or train a prompt-tuning artifact (--method prompt)."
            )
        artifacts.check_base(saved, self, where)
        return method.token_vectors(saved.tensors[method.artifact_key])  # (n, hidden)

    def prompt_embeds(self, soft: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
        """`[P; E]` (n + T, hidden): what the model reads for token ids after soft prompt P (None: E alone)."""
        embeds = self.embed(ids)
        return embeds if soft is None else torch.cat([soft.to(embeds.dtype), embeds])


def _read_fingerprinted(folder: Path, config: PretrainedConfig) -> list[torch.Tensor] | None:
    """The input-embedding table and the model's last three parameters, read by name from the folder's safetensors
    files (the model is built on the meta device, for the names only); None where a name is not in the files."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    names = [name for name, param in model.named_parameters() if param is embedding]
    names += [name for name, _ in model.named_parameters()][-3:]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        files = dict.fromkeys(names, "model.safetensors")
    tensors = []
    for name in names:
        path = folder / files.get(name, "")
        if not path.is_file():
            return None
        with safe_open(path, "pt") as f:
            if name not in f.keys():
                return None
            tensors.append(f.get_tensor(name))
    return tensors


@functools.lru_cache(maxsize=4)
def _front(model: str) -> InputEmbeddings:
    return InputEmbeddings.load(model)


def prompt_embeds(prompt_dir: str | Path, text: str, model: str | None = None, raw: bool = False) -> torch.Tensor:
    """`[P; E]` for `text` after the prompt-tuning artifact in `prompt_dir`: the text filled into the template the
    prompt was trained with (unless `raw`), tokenized as in training. `model`: the base model (default: the one the
    artifact records). Post it to `vllm serve --enable-prompt-embeds` as `encode(...)`."""
    saved = artifacts.load(prompt_dir)
    front = _front(model or saved.base_model)
    soft = front.prompt_input(saved, str(prompt_dir))
    fields = set(saved.task.fields)
    if not raw and len(fields) > 1:
        raise SoftPromptError(f"{prompt_dir}'s template {saved.task.template!r} has {len(fields)} fields: fill it "
                              "yourself and pass raw=True")  # fmt: skip
    filled = text if raw else saved.task.fill_text(text)
    return front.prompt_embeds(soft, front.tokenizer(filled)["input_ids"])


def encode(embeds: torch.Tensor) -> str:
    """The base64 `torch.save` bytes that vLLM's `prompt_embeds` field takes."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
