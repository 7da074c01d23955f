"""What a saved prompt holds: shapes, size, vector norms, how its soft tokens relate to each other (cosine), the
nearest vocabulary tokens of each one (Lester et al. 2021 read learned prompts this way), and comparisons across
prompts. Prompt tuning's vectors are input embeddings; a prefix's per-token vector is its key/values of every layer,
flattened (layers, 2, kv_heads, head_dim), which no vocabulary embedding can be compared with."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import methods
from . import WEIGHTS, Artifact
from ..atomic import write_atomic
from ..errors import SoftPromptError

HEATMAP, NEAREST_TABLE, COMPARE_HEATMAP = "similarity.png", "nearest_tokens.tsv", "compare.png"


def token_vectors(artifact: Artifact) -> torch.Tensor:
    """One vector per virtual token, (n, width): the embeddings, or each token's key/values of all layers."""
    method = methods.REGISTRY[artifact.prompt.method]
    return method.token_vectors(artifact.tensors[method.artifact_key])


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(rows of a, rows of b) cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def nearest_with_scores(vectors, embeddings, tokenizer, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each row of `vectors` (n, hidden), the k vocabulary tokens closest by cosine, with the cosine."""
    top = cosine_matrix(vectors, embeddings).topk(k, dim=-1)  # (n, k)
    return [[(tokenizer.decode([int(i)]), float(s)) for i, s in zip(ids, scores)]
            for ids, scores in zip(top.indices, top.values)]  # fmt: skip


def nearest_tokens(vectors: torch.Tensor, embeddings: torch.Tensor, tokenizer, k: int = 5) -> list[list[str]]:
    """For each row of `vectors` (n, hidden), the k vocabulary tokens whose embeddings are closest by cosine."""
    return [[token for token, _ in row] for row in nearest_with_scores(vectors, embeddings, tokenizer, k)]


def _rounded(matrix: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 4) for x in row] for row in matrix]


def describe(artifact: Artifact, prompt_dir: str | Path, backbone=None, k: int = 5, vocabulary=None) -> dict:
    """A JSON-ready report; nearest tokens (prompt tuning only) need the base model's vocabulary: `backbone`'s, or
    `vocabulary`, its (input-embedding table (vocab, hidden), tokenizer) where no model is loaded (a vLLM front)."""
    tensors, method = artifact.tensors, methods.REGISTRY[artifact.prompt.method]
    vectors = token_vectors(artifact)
    similarity = cosine_matrix(vectors, vectors)  # (n, n)
    n = len(vectors)
    off_diagonal = similarity[~torch.eye(n, dtype=torch.bool)]
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
        "norms": [round(float(x), 4) for x in vectors.norm(dim=-1)],
        "token_cosine": _rounded(similarity),
        "mean_token_cosine": round(float(off_diagonal.mean()), 4) if n > 1 else None,
    }
    if method.in_embedding_space:
        if backbone is not None:
            vocabulary = (backbone.model.get_input_embeddings().weight, backbone.tokenizer)
        if vocabulary is not None:
            embeddings, tokenizer = vocabulary[0].detach().cpu(), vocabulary[1]
            report["mean_vocab_norm"] = round(float(embeddings.norm(dim=-1).mean()), 4)
            nearest = nearest_with_scores(vectors, embeddings, tokenizer, k)
            report["nearest_tokens"] = [[token for token, _ in row] for row in nearest]
            report["nearest_cosines"] = [[round(score, 4) for _, score in row] for row in nearest]
    else:
        prefix = tensors[method.artifact_key]  # (layers, 2, kv_heads, n, head_dim)
        report["key_norm_per_layer"] = [round(float(x), 4) for x in prefix[:, 0].norm(dim=-1).mean(dim=(1, 2))]
        report["value_norm_per_layer"] = [round(float(x), 4) for x in prefix[:, 1].norm(dim=-1).mean(dim=(1, 2))]
    return report


def write_files(report: dict, out_dir: str | Path) -> list[Path]:
    """The token-by-token cosine heatmap (PNG) and, where there are nearest tokens, their table (TSV)."""
    out_dir = Path(out_dir)
    labels = [f"p{i}" for i in range(report["num_tokens"])]
    if "nearest_tokens" in report:
        labels = [f"{label} {row[0]!r}" for label, row in zip(labels, report["nearest_tokens"])]
    title = f"cosine between the {report['num_tokens']} virtual tokens ({report['method']})"
    written = [heatmap(report["token_cosine"], labels, labels, title, out_dir / HEATMAP)]
    if "nearest_tokens" in report:
        written.append(nearest_table(report, out_dir / NEAREST_TABLE))
    return written


def nearest_table(report: dict, path: Path) -> Path:
    """One row per virtual token: its norm, then the nearest tokens and their cosines."""
    k = len(report["nearest_tokens"][0])
    header = ["token", "norm"] + [f"{kind}{j + 1}" for j in range(k) for kind in ("nearest", "cosine")]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(header)
            for i, (tokens, cosines) in enumerate(zip(report["nearest_tokens"], report["nearest_cosines"])):
                pairs = [x for token, cosine in zip(tokens, cosines) for x in (repr(token), f"{cosine:.4f}")]
                writer.writerow([f"p{i}", f"{report['norms'][i]:.4f}", *pairs])

    write_atomic(path, write)
    return path


def heatmap(matrix, rows: list[str], columns: list[str], title: str, path: Path) -> Path:
    """A cosine matrix as a PNG, cells annotated when there are few."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.as_tensor(matrix, dtype=torch.float32).numpy()
    size = max(4.0, 0.35 * len(columns) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if values.size <= 100:
        for (i, j), value in _cells(values):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(value) > 0.6 else "black")  # readable on the dark ends of the scale
    fig.colorbar(image, ax=ax, label="cosine")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def _cells(values):
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            yield (i, j), float(values[i, j])


def compare(artifacts: list[Artifact], names: list[str]) -> dict:
    """Pairwise cosine between prompts: of the whole prompts (token by token, same shapes only) and of their mean
    token vectors (any lengths); norms of each. Prompts of one method only: the two live in different spaces."""
    methods = {a.prompt.method for a in artifacts}
    if len(methods) > 1:
        kinds = ", ".join(f"{name}: {a.prompt.method}" for name, a in zip(names, artifacts))
        raise SoftPromptError(f"compare needs prompts of one method (input embeddings and key/values are different "
                              f"spaces); got {kinds}.")  # fmt: skip
    vectors = [token_vectors(a) for a in artifacts]
    widths = {v.shape[-1] for v in vectors}
    if len(widths) > 1:
        raise SoftPromptError(f"compare needs prompts of one base model; their vectors have widths {sorted(widths)}.")
    same_shape = len({tuple(v.shape) for v in vectors}) == 1
    flat = torch.stack([v.flatten() for v in vectors]) if same_shape else None  # (M, n * width)
    means = torch.stack([v.mean(0) for v in vectors])  # (M, width)
    return {
        "prompts": [
            {"name": name, "method": a.prompt.method, "num_tokens": a.prompt.num_tokens, "base_model": a.base_model,
             "template": a.task.template, "mean_norm": round(float(v.norm(dim=-1).mean()), 4)}
            for name, a, v in zip(names, artifacts, vectors)
        ],
        "cosine": _rounded(cosine_matrix(flat, flat)) if flat is not None else None,
        "mean_vector_cosine": _rounded(cosine_matrix(means, means)),
        "base_models_differ": len({a.base_fingerprint for a in artifacts}) > 1,
    }  # fmt: skip


def compare_heatmap(report: dict, path: Path) -> Path:
    names = [p["name"] for p in report["prompts"]]
    if report["cosine"] is not None:
        return heatmap(report["cosine"], names, names, "cosine between prompts (token by token)", path)
    return heatmap(report["mean_vector_cosine"], names, names, "cosine between the prompts' mean vectors", path)


def format_compare(report: dict) -> str:
    names = [p["name"] for p in report["prompts"]]
    width = max(len(name) for name in names)
    lines = [f"{'prompt':<{width}}  method  tokens  mean norm"]
    lines += [f"{p['name']:<{width}}  {p['method']:<6}  {p['num_tokens']:6d}  {p['mean_norm']:9.3f}"
              for p in report["prompts"]]  # fmt: skip
    if report["base_models_differ"]:
        lines.append("note: these prompts were trained on different base models")
    for key, title in (("cosine", "cosine between whole prompts (token by token)"),
                       ("mean_vector_cosine", "cosine between the prompts' mean token vectors")):  # fmt: skip
        if report[key] is None:
            lines.append(f"\n{title}: not defined (the prompts differ in length)")
            continue
        lines.append(f"\n{title}:")
        lines.append(" " * width + "  " + "  ".join(f"{i:>7}" for i in range(len(names))))
        for i, (name, row) in enumerate(zip(names, report[key])):
            lines.append(f"{name:<{width}}  " + "  ".join(f"{x:7.3f}" for x in row) + f"   ({i})")
    return "\n".join(lines)


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
    norms = report["norms"]
    lines.append(f"vector norms  mean {sum(norms) / len(norms):.3f}, min {min(norms):.3f}, max {max(norms):.3f}")
    if report["mean_token_cosine"] is not None:
        lines.append(f"cosine        {report['mean_token_cosine']:.3f} on average between two virtual tokens")
    if "nearest_tokens" in report:
        lines.append(f"nearest vocabulary tokens (cosine); mean vocabulary embedding norm {report['mean_vocab_norm']}:")
        for i, (tokens, cosines, norm) in enumerate(zip(report["nearest_tokens"], report["nearest_cosines"], norms)):
            shown = "  ".join(f"{t!r} {c:.2f}" for t, c in zip(tokens, cosines))
            lines.append(f"  p{i:<3} norm {norm:7.3f}  {shown}")
    elif "key_norm_per_layer" in report:
        lines.append("prefix tuning has no input embeddings, so no nearest tokens; mean key/value norms per layer:")
        for i, (k, v) in enumerate(zip(report["key_norm_per_layer"], report["value_norm_per_layer"])):
            lines.append(f"  layer {i:<3} key {k:8.3f}  value {v:8.3f}")
    return "\n".join(lines)
