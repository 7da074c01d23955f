"""The training axes of scaling.py: softprompt and PEFT side by side (common/training.py, as train_speed.py runs
them), one point per value of an axis: input length, virtual tokens, batch size, model size. Each point is 1 untimed
warm-up step and `steps` timed steps, its step-0 losses checked against the independent reference first."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.common.machine import log
from benchmarks.common.training import (BATCH_SIZE, MB, PairSettings, RunResult, batch_tokens, draw_batches,
                                        is_correct, make_task, model_state, reference_loss, rel_diff,
                                        side_by_side)  # fmt: skip

VIRTUAL_TOKENS = 20
"""Virtual tokens wherever an axis does not vary them."""
FEWER_STEPS_ABOVE = 500_000_000
"""Models with more parameters than this run half the timed steps (at least 1): one step of ~1B takes ~25 s here."""

LLAMA_SHAPES = {  # name -> LlamaConfig shape arguments
    "135M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536),  # SmolLM2-135M's own config
    "360M": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                 intermediate_size=2560),  # SmolLM2-360M's
    "1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),  # Llama-3.2-1B's layers (its vocabulary is 128k; ours 49152)
}  # fmt: skip
TINY_SHAPES = {
    "tiny-a": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128),
    "tiny-b": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256),
}  # fmt: skip


@dataclass(frozen=True)
class TrainSizes:
    """The points of the training axes."""

    lengths: tuple[int, ...]
    virtual_tokens: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    models: dict[str, dict]


FULL = TrainSizes(lengths=(32, 64, 128, 256, 512), virtual_tokens=(10, 20, 50, 100, 200),
                  batch_sizes=(1, 2, 4, 8, 16, 32), models=LLAMA_SHAPES)  # fmt: skip
QUICK = TrainSizes(lengths=(16, 32), virtual_tokens=(4, 8), batch_sizes=(1, 2), models=TINY_SHAPES)


@dataclass
class TrainSetup:
    """What every training point shares."""

    steps: int
    pair: PairSettings


# ---------------------------------------------------------------------------------------------------- data
def fixed_length_batches(task, records: list[dict], length: int, count: int, seed: int) -> list[list]:
    """`count` batches of 8 classification examples of exactly `length` real tokens each (input + the one-token label
    word): `Review:` and review texts concatenated from a seeded position until long enough, cut, then
    `\\nSentiment:` and the first review's label word as the target. The cost of a step depends on the lengths only."""
    from softprompt.data import Example

    tokenizer = task.tokenizer
    tail = tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    examples = []
    for i in range(count * BATCH_SIZE):
        label = task.label_index(records[order[i]]["label"])
        target = task.label_ids[label]
        room = length - len(target) - len(tail)  # input tokens before the tail
        if room < 1:
            raise SystemExit(f"{length} tokens per row leave no room for a review before the tail and label word")
        ids, j = task.input_ids("Review:"), i
        while len(ids) < room:
            ids += tokenizer(" " + records[order[j % len(order)]]["text"], add_special_tokens=False)["input_ids"]
            j += 1
        examples.append(Example(ids[:room] + tail, list(target), label=label))
    assert all(len(e.input_ids) + len(e.target_ids) == length for e in examples)
    return [examples[i : i + BATCH_SIZE] for i in range(0, len(examples), BATCH_SIZE)]


def random_llama(shape: dict, tokenizer, seed: int):
    """A random-weight Llama-family causal LM of `shape` (float32, seeded), frozen, as a backbone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from softprompt.backbones import backbone_for

    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return backbone_for(model, tokenizer)  # freezes it


# ---------------------------------------------------------------------------------------------------- a point
def point_summary(ours: RunResult, peft: RunResult, reference: float) -> dict:
    """One point's summary, by train_speed.py's rules (its `summarize` takes medians over repetitions; a point here
    is one run): correctness against the reference first; no ratio against a peer whose step-0 loss is not the
    reference's."""
    peer_correct = is_correct(peft.loss_step0, reference)
    return {
        "peer_correct": peer_correct,
        "ours_correct": is_correct(ours.loss_step0, reference),
        "speedup": round(ours.tokens_per_s / peft.tokens_per_s, 3) if peer_correct else None,
        "memory_ratio": round(ours.peak_bytes / peft.peak_bytes, 3) if peer_correct else None,
        "ours_tokens_per_s": round(ours.tokens_per_s, 1),
        "peft_tokens_per_s": round(peft.tokens_per_s, 1),
        "ours_peak_mb": round(ours.peak_bytes / MB, 1),
        "peft_peak_mb": round(peft.peak_bytes / MB, 1),
        "reference_loss_step0": round(reference, 6),
        "ours_loss_step0": round(ours.loss_step0, 6),
        "peft_loss_step0": round(peft.loss_step0, 6),
        "loss_rel_diff_step0": rel_diff(ours.loss_step0, peft.loss_step0),
        "ours_loss_last": round(ours.loss_last, 6),
        "peft_loss_last": round(peft.loss_last, 6),
    }


def train_point(backbone, method: str, n: int, batches: list[list], setup: TrainSetup) -> dict:
    """One point: the independent step-0 reference loss, then ours and PEFT side by side over `batches` (the first
    one the warm-up step)."""
    before = model_state(backbone.model)
    reference = reference_loss(backbone, method, n, setup.pair.seed, batches[0])
    runs = side_by_side(backbone, method, n, batches, setup.pair, flip=False, before=before)
    row = point_summary(runs["ours"], runs["peft"], reference)
    row.update(method=method, virtual_tokens=n, batch_size=len(batches[0]), timed_steps=len(batches) - 1,
               tokens_per_step=round(statistics.mean(map(batch_tokens, batches)), 1))  # fmt: skip
    return row


def timed_point(axis: str, label: str, x: int, backbone, method: str, n: int, batches: list[list],
                setup: TrainSetup) -> dict:
    """`train_point` with its progress line; its row gets x, a label and its seconds."""
    started = time.perf_counter()
    row = {"x": x, "label": label, **train_point(backbone, method, n, batches, setup)}
    row["seconds"] = round(time.perf_counter() - started, 1)
    peft = (f"PEFT {row['peft_tokens_per_s']:.1f} tok/s {row['peft_peak_mb']:.0f} MB" if row["peer_correct"]
            else f"PEFT wrong (step-0 loss {row['peft_loss_step0']} vs {row['reference_loss_step0']})")  # fmt: skip
    log(f"[{axis}] {label}: ours {row['ours_tokens_per_s']:.1f} tok/s {row['ours_peak_mb']:.0f} MB, {peft}, "
        f"ours correct {row['ours_correct']} ({row['seconds']:.0f} s)")  # fmt: skip
    return row


def warm_up(backbone, records: list[dict], setup: TrainSetup) -> None:
    """One paired step before any point: the process's one-time allocations stay out of the first point's peak."""
    task = make_task(backbone.tokenizer, "cls")
    train_point(backbone, "prompt", VIRTUAL_TOKENS, draw_batches(task, records, 1, setup.pair.seed), setup)


# ---------------------------------------------------------------------------------------------------- the axes
def train_length(backbone, records: list[dict], sizes: TrainSizes, setup: TrainSetup) -> list[dict]:
    task = make_task(backbone.tokenizer, "cls")
    return [timed_point("train_length", f"{length} tokens/row", length, backbone, "prompt", VIRTUAL_TOKENS,
                        fixed_length_batches(task, records, length, setup.steps + 1, setup.pair.seed), setup)
            for length in sizes.lengths]  # fmt: skip


def train_virtual_tokens(backbone, records: list[dict], sizes: TrainSizes, setup: TrainSetup) -> list[dict]:
    task = make_task(backbone.tokenizer, "cls")
    batches = draw_batches(task, records, setup.steps + 1, setup.pair.seed)
    return [timed_point("train_virtual_tokens", f"{method} tuning, {n} virtual tokens", n, backbone, method, n,
                        batches, setup)
            for method in ("prompt", "prefix") for n in sizes.virtual_tokens]  # fmt: skip


def train_batch(backbone, records: list[dict], sizes: TrainSizes, setup: TrainSetup) -> list[dict]:
    task = make_task(backbone.tokenizer, "cls")
    return [timed_point("train_batch", f"batch {size}", size, backbone, "prompt", VIRTUAL_TOKENS,
                        draw_batches(task, records, setup.steps + 1, setup.pair.seed, size), setup)
            for size in sizes.batch_sizes]  # fmt: skip


def train_model_size(backbone, records: list[dict], sizes: TrainSizes, setup: TrainSetup) -> list[dict]:
    tokenizer = backbone.tokenizer
    task = make_task(tokenizer, "cls")
    rows = []
    for name, shape in sizes.models.items():
        started = time.perf_counter()
        llama = random_llama(shape, tokenizer, setup.pair.seed)
        params = sum(p.numel() for p in llama.model.parameters())  # tied embeddings counted once
        log(f"[train_model_size] {name}: {params:,} parameters, built in {time.perf_counter() - started:.0f} s")
        steps = setup.steps if params <= FEWER_STEPS_ABOVE else max(1, setup.steps // 2)
        batches = draw_batches(task, records, steps + 1, setup.pair.seed)
        row = timed_point("train_model_size", f"{name} ({params / 1e6:.0f}M parameters)", params, llama, "prompt",
                          VIRTUAL_TOKENS, batches, setup)  # fmt: skip
        rows.append({**row, "model": name, "parameters": params, "shape": shape})
        del llama  # the next model is built with this one's memory freed
        gc.collect()
    return rows


TRAIN_AXES = {"train_length": train_length, "train_virtual_tokens": train_virtual_tokens,
              "train_batch": train_batch, "train_model_size": train_model_size}  # fmt: skip
