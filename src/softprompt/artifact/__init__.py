"""The saved prompt: a directory with `prompt.safetensors` and a self-describing `config.json`.

prompt tuning stores `prompt_embeddings` (num_tokens, hidden_size); prefix tuning stores `prefix`
(num_layers, 2, num_kv_heads, num_tokens, head_dim), keys then values, any MLP folded away.

Each file is replaced atomically, but the two are two renames: the weights carry their sha256 in their own header,
and config.json names it (`weights_sha256`), so a pair from two saves (a crash between the renames, files copied
from two artifacts) is refused instead of loading a prompt under another one's settings.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__, methods
from ..atomic import write_atomic, write_json
from ..backbones import Backbone
from ..config import PromptConfig, TaskConfig, from_dict, to_dict
from ..errors import SoftPromptError
from ..models import FINGERPRINT_VERSION

WEIGHTS, CONFIG = "prompt.safetensors", "config.json"
FORMAT = "softprompt/1"


@dataclass
class Artifact:
    prompt: PromptConfig
    task: TaskConfig
    tensors: dict[str, torch.Tensor]
    base_model: str
    base_fingerprint: str
    extra: dict = field(default_factory=dict)
    """Everything else config.json records (shapes, version, training summary)."""


def save(out_dir: str | Path, method, task: TaskConfig, backbone: Backbone, training: dict | None = None) -> Path:
    """Write the artifact into `out_dir` (created if needed); each file replaced atomically."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in method.artifact_tensors().items()}
    model, sha256, base = backbone.model, digest(tensors), backbone.fingerprint
    config = {
        "format": FORMAT,
        **to_dict(method.config),
        **to_dict(task),
        "base_model": model.config.name_or_path,
        "base_model_fingerprint": str(base),
        "base_model_sample": base.sample,
        "base_model_dtype": str(model.dtype).removeprefix("torch."),
        "base_model_type": model.config.model_type,
        "shapes": {**vars(backbone.shapes)},
        "tensor_shapes": {k: list(v.shape) for k, v in tensors.items()},
        "weights_sha256": sha256,
        "softprompt_version": __version__,
        "training": training or {},
    }
    metadata = {"format": FORMAT, "sha256": sha256}
    write_atomic(out_dir / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_json(out_dir / CONFIG, config)
    return out_dir


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names, shapes and bytes. Kept in the file's own header, so the file checks itself
    (safetensors checks only sizes: a flipped byte would otherwise load as a silently wrong prompt)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().float().contiguous().cpu()
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors and their sha256 (`digest`), checked against the one in the file's header where it has one."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SoftPromptError(
            f"{path} is corrupted or truncated ({error}); retrain, or restore it from a checkpoint."
        ) from None
    sha256 = digest(tensors)
    if "sha256" in metadata and metadata["sha256"] != sha256:  # artifacts of older versions have none
        raise SoftPromptError(
            f"{path} is corrupted: its tensors no longer match the checksum written with them; retrain, or "
            "restore it from a checkpoint."
        )
    return tensors, sha256


def load(prompt_dir: str | Path) -> Artifact:
    """Read an artifact, with a clear message for each way it can be broken."""
    prompt_dir = Path(prompt_dir)
    config_path, weights_path = prompt_dir / CONFIG, prompt_dir / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise SoftPromptError(f"{path} is missing: {prompt_dir} is not a softprompt artifact (train --out makes one).")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SoftPromptError(f"{config_path} is not valid JSON ({error}); the artifact is damaged.") from None
    if not isinstance(data, dict):
        raise SoftPromptError(f"{config_path} holds no JSON object; the artifact is damaged.")
    tensors, sha256 = _read_weights(weights_path)
    named = data.get("weights_sha256")  # artifacts of older versions name none
    if named is not None and named != sha256:
        raise SoftPromptError(
            f"{config_path} belongs to other weights than {weights_path} (it names sha256 {str(named)[:12]}..., the "
            f"file holds {sha256[:12]}...): the two files come from different saves, e.g. a save interrupted between "
            "them or files copied from two artifacts. Save or copy the artifact again, both files together."
        )
    try:
        prompt = from_dict(PromptConfig, data).folded()  # what is saved is always folded
        task = from_dict(TaskConfig, data)
    except (SoftPromptError, TypeError) as error:
        raise SoftPromptError(f"{config_path} describes no valid prompt: {error}") from None
    method = methods.REGISTRY[prompt.method]
    expected = method.artifact_key
    if expected not in tensors:
        raise SoftPromptError(f"{weights_path} lacks the tensor {expected!r} that method={prompt.method} needs.")
    recorded = (data.get("tensor_shapes") or {}).get(expected)
    actual = list(tensors[expected].shape)
    tokens = actual[method.token_axis]
    if (recorded is not None and recorded != actual) or tokens != prompt.num_tokens:
        raise SoftPromptError(
            f"{weights_path} holds {expected} of shape {actual}, but {config_path} describes "
            f"{recorded or f'{prompt.num_tokens} virtual tokens'}: the two files come from different runs."
        )
    if not torch.isfinite(tensors[expected]).all():
        raise SoftPromptError(f"{weights_path} holds non-finite values (NaN or inf); retrain with a lower --lr.")
    extra = {k: v for k, v in data.items() if k not in to_dict(prompt) and k not in to_dict(task)}
    return Artifact(prompt, task, tensors, data.get("base_model", "?"), data.get("base_model_fingerprint", ""), extra)


def check_base(artifact: Artifact, backbone: Backbone, where: str = "the prompt") -> None:
    """Refuse a prompt trained on another base model: it would load but produce nonsense. The same model loaded in
    another dtype, on another device or placement, is the same model (`models.Fingerprint`)."""
    actual = backbone.fingerprint
    expected_shapes = artifact.extra.get("shapes")
    shapes_differ = expected_shapes is not None and expected_shapes != vars(backbone.shapes)
    recorded = artifact.base_fingerprint  # "" in artifacts of the oldest versions: nothing to check
    same = actual.matches(recorded, artifact.extra.get("base_model_sample", ""),
                          artifact.extra.get("base_model_dtype", "")) if recorded else True  # fmt: skip
    if same is None:
        warnings.warn(f"{where} was saved by an older softprompt, whose fingerprint of the base model can only be "
                      f"checked on the model loaded in float32; {backbone.name!r} is loaded in {backbone.dtype}, so "
                      "only its shapes were checked.", stacklevel=2)  # fmt: skip
    if shapes_differ or same is False:
        older = recorded and not recorded.startswith(FINGERPRINT_VERSION)  # shown in its own scheme
        raise SoftPromptError(
            f"{where} was trained on base model {artifact.base_model!r} (fingerprint {artifact.base_fingerprint}), "
            f"but the loaded model {backbone.name!r} has fingerprint {actual.legacy if older else actual}"
            + (f" and shapes {vars(backbone.shapes)} instead of {expected_shapes}" if shapes_differ else "")
            + f". Load it onto {artifact.base_model!r} (--model {artifact.base_model})."
        )


def attach(artifact: Artifact, backbone: Backbone, where: str = "the prompt"):
    """The artifact's method on `backbone`, after checking it belongs to this base model."""
    check_base(artifact, backbone, where)
    return methods.from_tensors(artifact.prompt, backbone, artifact.tensors)


def prefix_of(artifact: Artifact, backbone: Backbone, where: str = "the prompt") -> torch.Tensor:
    """The artifact's per-layer K/V prefix on `backbone` (checked to belong to it), for inference: no gradient."""
    with torch.no_grad():
        return attach(artifact, backbone, where).kv(backbone).detach()
