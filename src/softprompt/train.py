"""One flat training loop: batch -> forward -> loss -> backward -> clip -> step -> log -> eval/save.

Only the prompt method's parameters reach the optimizer; the base model was frozen once by Backbone. The
artifact written to `out_dir` is always the best prompt seen on the validation set (the last one without one).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.optimization import Adafactor

from . import artifact, methods
from .checkpoint import save_checkpoint
from .backbone import Backbone
from .config import PromptConfig, TrainConfig, to_dict
from .data import Example, Task, collate
from .errors import SoftPromptError
from .evaluate import evaluate


@dataclass
class Run:
    """What a training run returns."""

    method: methods.PromptMethod
    """The best prompt (loaded back from the artifact)."""
    summary: dict
    """Also stored in the artifact's config.json under `training`."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        return Adafactor(
            params, lr=config.lr, weight_decay=config.weight_decay,
            scale_parameter=False, relative_step=False, warmup_init=False,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def batch_stream(examples: list[Example], batch_size: int, generator: torch.Generator):
    """Endless seeded shuffles of the data cut into full batches (each epoch drops its short tail)."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]
        if len(order) < batch_size:
            yield [examples[i] for i in order]


def loss_on(backbone: Backbone, kv: torch.Tensor, examples: list[Example]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the examples' target tokens (full vocabulary, head run only at those positions)."""
    batch = collate(examples, backbone.tokenizer.pad_token_id).to(backbone.device)
    cache = backbone.new_cache(kv, batch.input_ids.shape[0])
    hidden, _ = backbone.forward(batch.input_ids, batch.attention_mask, cache)
    logits = backbone.logits(hidden[batch.loss_rows, batch.loss_positions])  # (K, vocab)
    return F.cross_entropy(logits, batch.loss_tokens), batch.num_input_tokens


def selection_key(result: dict) -> tuple:
    """Higher is better: accuracy then gold-label log-probability (classification), or -loss (generation)."""
    if "accuracy" in result:
        return (result["accuracy"], result["gold_logprob"])
    return (-result["loss"],)


def train(
    backbone: Backbone,
    task: Task,
    prompt_config: PromptConfig,
    train_config: TrainConfig,
    train_examples: list[Example],
    out_dir: str | Path,
    valid_examples: list[Example] | None = None,
    init_method: methods.PromptMethod | None = None,
    progress: bool = True,
) -> Run:
    cfg = train_config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=backbone.device.type == "cpu")
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    method = init_method or methods.build(prompt_config, backbone, task.config.labels, generator)
    optimizer = make_optimizer(method.parameters(), cfg)
    scheduler = get_scheduler(
        cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
        optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps,
    )
    model, optimizer, scheduler = accelerator.prepare(method, optimizer, scheduler)
    valid = (valid_examples or [])[: cfg.eval_size]
    micro_size = cfg.batch_size // cfg.grad_accum
    stream = batch_stream(train_examples, cfg.batch_size, generator)
    log_path = out_dir / "metrics.jsonl"
    log_path.write_text("")
    history, best, evals_without_gain = [], None, 0
    tokens_seen, train_seconds, started = 0, 0.0, time.perf_counter()

    def log(record: dict) -> None:
        history.append(record)
        with log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def validate(step: int) -> dict:
        with torch.no_grad():
            result = evaluate(backbone, task, valid, method.kv(backbone))
        log({"step": step, "valid": result})
        return result

    def save_best(step: int, result: dict) -> None:
        nonlocal best_tensors, summary
        best_tensors = method.artifact_tensors()
        summary = {"best_step": step, "valid": result, **to_dict(cfg)}
        artifact.save(out_dir, method, task.config, backbone, training=summary)  # kept on disk as we go

    best_tensors, summary = {}, {}
    if valid:
        result = validate(0)
        best = selection_key(result)
        save_best(0, result)

    bar = tqdm(range(1, cfg.steps + 1), desc="training", disable=not progress)
    stopped_early = False
    for step in bar:
        step_started = time.perf_counter()
        step_loss = 0.0
        batch = next(stream)
        for start in range(0, len(batch), micro_size):
            # The prompt's K/V is computed once per micro-batch (once per step without accumulation), shared by rows.
            kv = model(backbone)
            loss, tokens = loss_on(backbone, kv, batch[start : start + micro_size])
            accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.item() / cfg.grad_accum
            tokens_seen += tokens
        if not math.isfinite(step_loss):
            raise SoftPromptError(
                f"The loss became {step_loss} at step {step}; the best prompt so far stays in {out_dir}. "
                f"Try a lower learning rate (now {cfg.lr}) or gradient clipping (--max-grad-norm)."
            )
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - step_started
        log({"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
             "tokens_per_s": round(tokens_seen / train_seconds, 1)})
        bar.set_postfix(loss=f"{step_loss:.4f}")

        if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
            if valid:
                result = validate(step)
                if selection_key(result) > best:
                    best, evals_without_gain = selection_key(result), 0
                    save_best(step, result)
                else:
                    evals_without_gain += 1
            save_checkpoint(out_dir, step, {
                "method": method.checkpoint_tensors(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "best": best, "evals_without_gain": evals_without_gain,
            })
            if valid and cfg.patience and evals_without_gain >= cfg.patience:
                stopped_early = True
                break
    bar.close()

    if not valid:
        save_best(step, {})
    plot_losses(history, out_dir / "loss.png")
    summary.update(last_step=step, stopped_early=stopped_early, seconds=round(time.perf_counter() - started, 1))
    best_method = methods.from_tensors(method.config, backbone, best_tensors)
    artifact.save(out_dir, best_method, task.config, backbone, training=summary)
    return Run(best_method, summary)


def plot_losses(history: list[dict], path: Path) -> None:
    """Training loss (raw and smoothed) and the validation metric, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history if "loss" in r]
    losses = [r["loss"] for r in history if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.35, label="train loss")
    if losses:
        smooth, value = [], losses[0]
        for x in losses:
            value = 0.9 * value + 0.1 * x
            smooth.append(value)
        ax.plot(steps, smooth, label="train loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = [r for r in history if "valid" in r]
    if evals:
        key = "accuracy" if "accuracy" in evals[0]["valid"] else "loss"
        other = ax.twinx()
        other.plot([r["step"] for r in evals], [r["valid"][key] for r in evals], "o-", color="tab:green",
                   label=f"valid {key}")
        other.set_ylabel(f"valid {key}")
        other.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
