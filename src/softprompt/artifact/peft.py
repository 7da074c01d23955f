"""Moving prompts to and from Hugging Face PEFT adapters (prompt tuning, P-tuning and prefix tuning).

A PEFT prompt-learning adapter is a folder with `adapter_config.json` and `adapter_model.safetensors` holding one
tensor, `prompt_embeddings` (PEFT 0.21, `get_peft_model_state_dict`):

- PROMPT_TUNING and P_TUNING: (num_virtual_tokens, hidden_size), the virtual input embeddings. P-tuning saves its
  prompt encoder's output, so it reads as plain prompt tuning.
- PREFIX_TUNING: (num_virtual_tokens, num_layers * 2 * token_dim) with token_dim = kv_heads * head_dim; per token,
  layer-major, keys then values of each layer. With `prefix_projection=True` PEFT saves the MLP's output, not the MLP,
  so it is the same layout (the reparameterization is already folded, as ours is).

Export needs no model: the artifact's config.json records the shapes. Import needs the base model, to check the
shapes and to fingerprint the artifact. What differs by method (its PEFT types, config entries, layout and shape
checks) is the method class's (`peft_types`, `peft_config`, `token_vectors`, `peft_problems`); this module keeps the
files and the flow.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import artifact, methods
from ..atomic import write_atomic, write_json
from ..backbones import Backbone, Shapes
from ..config import PromptConfig, TaskConfig
from ..errors import SoftPromptError

ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
KEY = "prompt_embeddings"
READABLE = {peft_type: cls for cls in methods.REGISTRY.values() for peft_type in cls.peft_types}
"""PEFT types we read, and the method class each becomes."""


def export_peft(prompt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the artifact in `prompt_dir` as a PEFT adapter folder that `PeftModel.from_pretrained(base, out_dir)`
    loads onto the same base model."""
    saved = artifact.load(prompt_dir)
    shapes = saved.extra.get("shapes")
    if not shapes:
        raise SoftPromptError(f"{prompt_dir}/config.json records no model shapes; re-save it with this version.")
    n, method = saved.prompt.num_tokens, methods.REGISTRY[saved.prompt.method]
    config = {
        "base_model_name_or_path": saved.base_model,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "num_virtual_tokens": n,
        "num_transformer_submodules": 1,
        "num_layers": shapes["num_layers"],
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
        **method.peft_config(Shapes(**shapes)),
    }
    weight = method.token_vectors(saved.tensors[method.artifact_key])  # PEFT's (n, width)
    out_dir = Path(out_dir)
    tensors = {KEY: weight.float().contiguous()}
    write_atomic(out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(out_dir / ADAPTER_CONFIG, config)
    return out_dir


def read_adapter(peft_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of a PEFT adapter folder, with a clear message for each way it fails."""
    peft_dir = Path(peft_dir)
    config_path = peft_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise SoftPromptError(f"{config_path} is missing: {peft_dir} is not a PEFT adapter folder.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SoftPromptError(f"{config_path} is not valid JSON ({error}).") from None
    peft_type = str(config.get("peft_type", "?"))
    if peft_type not in READABLE:
        raise SoftPromptError(
            f"{peft_dir} holds a {peft_type} adapter; softprompt reads only prompt-learning adapters "
            f"({', '.join(READABLE)}). LoRA-style adapters change the model's weights and are no prompt."
        )
    weights = peft_dir / ADAPTER_WEIGHTS
    try:
        if weights.is_file():
            tensors = load_file(weights)
        elif (peft_dir / ADAPTER_BIN).is_file():
            tensors = torch.load(peft_dir / ADAPTER_BIN, map_location="cpu", weights_only=True)
        else:
            raise SoftPromptError(f"{peft_dir} has no {ADAPTER_WEIGHTS} (nor {ADAPTER_BIN}).")
    except (SafetensorError, OSError, RuntimeError) as error:
        raise SoftPromptError(f"the weights in {peft_dir} cannot be read ({error}).") from None
    return config, tensors


def _check(problems: list[str], peft_dir, backbone: Backbone) -> None:
    if problems:
        raise SoftPromptError(
            f"the PEFT adapter in {peft_dir} does not fit {backbone.model.config.name_or_path!r}:\n  - "
            + "\n  - ".join(problems)
        )


def import_peft(peft_dir: str | Path, out_dir: str | Path, backbone: Backbone, task: TaskConfig) -> Path:
    """Read a PEFT prompt-tuning, P-tuning or prefix-tuning adapter made for `backbone`'s model and save it as our
    artifact in `out_dir`. PEFT adapters carry no template, so `task` says how records become input."""
    config, tensors = read_adapter(peft_dir)
    peft_type, s = config["peft_type"], backbone.shapes
    if KEY not in tensors:
        raise SoftPromptError(
            f"{peft_dir}: a {peft_type} adapter should hold the tensor {KEY!r}, found {sorted(tensors)}."
        )
    weight = tensors[KEY].detach().float()
    problems = []
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type {config['task_type']} (softprompt serves causal LMs: CAUSAL_LM)")
    if config.get("num_transformer_submodules") not in (None, 1):
        problems.append(f"num_transformer_submodules {config['num_transformer_submodules']} (an encoder-decoder "
                        "adapter; causal LMs have 1)")  # fmt: skip
    n = int(config.get("num_virtual_tokens") or weight.shape[0])
    if weight.dim() != 2 or weight.shape[0] != n:
        problems.append(f"{KEY} has shape {tuple(weight.shape)}, expected {n} rows (num_virtual_tokens)")
    _check(problems, peft_dir, backbone)
    method = READABLE[peft_type]
    _check(method.peft_problems(config, weight, s), peft_dir, backbone)
    restored = {method.artifact_key: method.from_token_vectors(weight, s)}
    text = config.get("prompt_tuning_init_text") if config.get("prompt_tuning_init") == "TEXT" else None
    prompt = PromptConfig(method=method.name, num_tokens=n, init="text" if text else "random", init_text=text)
    imported = methods.from_tensors(prompt, backbone, restored)
    training = {
        "imported_from": str(Path(peft_dir).resolve()),
        "peft_type": peft_type,
        "peft_version": config.get("peft_version"),
        "peft_base_model": config.get("base_model_name_or_path"),
    }
    return artifact.save(out_dir, imported, task, backbone, training=training)
