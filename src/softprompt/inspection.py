"""What a saved prompt holds: shapes, size, vector norms and the nearest vocabulary tokens of each soft token."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .artifact import WEIGHTS, Artifact


def nearest_tokens(vectors: torch.Tensor, embeddings: torch.Tensor, tokenizer, k: int = 5) -> list[list[str]]:
    """For each row of `vectors` (n, hidden), the k vocabulary tokens whose embeddings are closest by cosine."""
    similarity = F.normalize(vectors.float(), dim=-1) @ F.normalize(embeddings.float(), dim=-1).T  # (n, vocab)
    top = similarity.topk(k, dim=-1).indices
    return [[tokenizer.decode([int(i)]) for i in row] for row in top]


def describe(artifact: Artifact, prompt_dir: str | Path, backbone=None, k: int = 5) -> dict:
    """A JSON-ready report; nearest tokens need the base model (prompt tuning only)."""
    tensors = artifact.tensors
    report = {
        "method": artifact.prompt.method,
        "num_tokens": artifact.prompt.num_tokens,
        "task": artifact.task.task,
        "template": artifact.task.template,
        "labels": artifact.task.labels,
        "base_model": artifact.base_model,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes_on_disk": (Path(prompt_dir) / WEIGHTS).stat().st_size,
        "training": artifact.extra.get("training", {}),
    }
    if artifact.prompt.method == "prompt":
        vectors = tensors["prompt_embeddings"]
        report["norms"] = [round(float(x), 4) for x in vectors.norm(dim=-1)]
        if backbone is not None:
            embeddings = backbone.model.get_input_embeddings().weight.detach().cpu()
            report["mean_vocab_norm"] = round(float(embeddings.norm(dim=-1).mean()), 4)
            report["nearest_tokens"] = nearest_tokens(vectors, embeddings, backbone.tokenizer, k)
    else:
        prefix = tensors["prefix"]  # (layers, 2, kv_heads, n, head_dim)
        report["key_norm_per_layer"] = [round(float(x), 4) for x in prefix[:, 0].norm(dim=-1).mean(dim=(1, 2))]
        report["value_norm_per_layer"] = [round(float(x), 4) for x in prefix[:, 1].norm(dim=-1).mean(dim=(1, 2))]
    return report


def format_report(report: dict) -> str:
    lines = [
        f"method        {report['method']} ({report['num_tokens']} virtual tokens, task: {report['task']})",
        f"base model    {report['base_model']}",
        f"template      {report['template']!r}",
    ]
    if report["labels"]:
        lines.append(f"labels        {', '.join(report['labels'])}")
    for name, shape in report["tensors"].items():
        lines.append(f"tensor        {name} {tuple(shape)}")
    lines.append(f"parameters    {report['parameters']:,}")
    lines.append(f"size on disk  {report['bytes_on_disk'] / 1024:.1f} KiB")
    if "nearest_tokens" in report:
        lines.append(f"nearest vocabulary tokens (cosine); mean vocabulary embedding norm {report['mean_vocab_norm']}:")
        for i, (tokens, norm) in enumerate(zip(report["nearest_tokens"], report["norms"])):
            lines.append(f"  p{i:<3} norm {norm:7.3f}  " + "  ".join(repr(t) for t in tokens))
    elif report["method"] == "prefix":
        lines.append("prefix tuning has no input embeddings, so no nearest tokens; mean key/value norms per layer:")
        for i, (k, v) in enumerate(zip(report["key_norm_per_layer"], report["value_norm_per_layer"])):
            lines.append(f"  layer {i:<3} key {k:8.3f}  value {v:8.3f}")
    return "\n".join(lines)
