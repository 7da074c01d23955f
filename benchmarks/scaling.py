"""How training and serving costs grow: softprompt against PEFT (training) and vLLM (serving), one axis at a time.

Training (train_* axes): softprompt and PEFT 0.21 train side by side in one process, exactly as train_speed.py runs
them, through its own functions: the same model object (PEFT wraps it), the same batches, the same initial values
(ours `init="vocab"` under --seed, copied into PEFT's prompt encoder), AdamW at the same learning rate, the two
libraries alternating step by step (`paired_runs`). Each point is 1 untimed warm-up step, then --steps timed steps
(the ~1B model: half as many, at least 1). Unless an axis says otherwise: prompt tuning, 20 virtual tokens,
classification (`Review: {text}\\nSentiment:`, the label word the only target), batch 8, float32, the embedded
SmolLM2-135M.
- throughput: real input tokens per second over the timed steps (input + target, no pads, no virtual tokens);
- peak memory: per step, the peak RSS during the step above the RSS just before it (train_speed's `PeakMemory`:
  the kernel's high-water mark VmHWM, reset per step, or 5 ms sampling where the kernel refuses the reset); a
  point's peak is the largest over its steps, warm-up included;
- correctness before any ratio: each library's step-0 loss against `reference_loss` (transformers' own loss over
  full logits of explicit `[P; E]`, or the prefix as the model's past) within 1e-4 relative. A point whose PEFT loss
  is not the reference's has `"peer_correct": false`, no speedup or memory ratio, and no PEFT value in the plots
  (its measured values stay in the JSON).
Axes:
- train_length: 32, 64, 128, 256, 512 real tokens per row, every row exactly that long (review texts concatenated
  behind `Review:`, cut, then `\\nSentiment:` and a label word: speed does not depend on the text);
- train_virtual_tokens: 10, 20, 50, 100, 200 virtual tokens, prompt tuning and prefix tuning (PEFT's without
  projection), ordinary review batches;
- train_batch: batch sizes 1, 2, 4, 8, 16, 32 of ordinary review batches;
- train_model_size: random-weight Llama-family models built from `LlamaConfig` under `torch.manual_seed` (nothing
  downloaded; the embedded tokenizer, vocabulary 49152, tied embeddings): SmolLM2-135M's own shape, a
  SmolLM2-360M-like one and a Llama-3.2-1B-like one (its layer shapes, this vocabulary).

Serving (serve_* axes), on the embedded model: soft prompts of 20 virtual tokens, random vocabulary-initialized
(serve_speed.py's `build_prompt`, seeds 0, 1, ...), requests of distinct short texts, each generating exactly 16
new tokens greedily (EOS ignored). A round is a set of requests that all arrive at once; the next round starts when
it has finished. Our engine (`softprompt.serve.engine.Engine`, driven step by step in this process, as
serve_speed.py does; each prompt's K/V computed beforehand, as the server's registry does) and vLLM (`vllm serve
--enable-prompt-embeds` from .venv-vllm, started by vllm_side.py's `start_vllm` after all in-process measurements,
each request streamed with `prompt_embeds` = `[P; E]`) run the same rounds. Both hold at most 128 rows at once
(vLLM's own default for its API server on CPU; our engine's max_batch set to match).
- throughput: generated tokens / the summed wall time of the rounds;
- time to first token: for each request, from its round's start to its first streamed token; median and p95;
- checks: our first request of each point against greedy decoding by the definition (serve_speed.py's
  `reference_generate`: uncached `[P; E]`), and how many of vLLM's outputs equal ours.
Axes:
- serve_prompts: 1, 4, 16, 64, 256 distinct prompts among one round of 256 requests (request i uses prompt i mod k);
- serve_concurrency: 1, 4, 16, 64 requests per round over 4 prompts, rounds repeated up to 32 requests per point.

Writes one PNG per axis (left: tokens/s; right: peak MB, or time to first token) and scaling.json with every point,
into --out (default docs/scaling; rewritten after each axis, so an interrupted run keeps what it measured; with
--only, the other axes already in scaling.json stay as they were, each with its own date).

    cd benchmarks && ../.venv/bin/python scaling.py                   # everything (about 16 min on 2 cores)
    ../.venv/bin/python scaling.py --only train_length,serve_prompts --steps 3
    ../.venv/bin/python scaling.py --quick --no-vllm                  # tiny sizes: a smoke check
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from machine import machine  # benchmarks/machine.py (scripts run from this folder)
from train_speed import (BATCH_SIZE, CORRECT_REL, MB, RunResult, draw_batches, make_task, model_state, ours_step,
                         paired_runs, peft_step, reference_loss, reset_high_water_mark)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
VIRTUAL_TOKENS = 20
"""Virtual tokens wherever an axis does not vary them."""
MAX_ROWS = 128
"""Rows decoded together by either server: vLLM's default max_num_seqs for its API server on CPU (0.32)."""
CONCURRENCY_PROMPTS = 4
"""Distinct prompts in serve_concurrency (request i uses prompt i mod 4)."""
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
class Sizes:
    """The points of every axis: the real ones, or tiny ones for --quick."""

    lengths: tuple[int, ...]
    virtual_tokens: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    models: dict[str, dict]
    serve_prompts: tuple[int, ...]
    serve_requests: int
    concurrency: tuple[int, ...]
    concurrency_requests: int
    """Requests per serve_concurrency point (rounds of `c` until this many; at least one round)."""
    new_tokens: int


FULL = Sizes(lengths=(32, 64, 128, 256, 512), virtual_tokens=(10, 20, 50, 100, 200), batch_sizes=(1, 2, 4, 8, 16, 32),
             models=LLAMA_SHAPES, serve_prompts=(1, 4, 16, 64, 256), serve_requests=256, concurrency=(1, 4, 16, 64),
             concurrency_requests=32, new_tokens=16)  # fmt: skip
QUICK = Sizes(lengths=(16, 32), virtual_tokens=(4, 8), batch_sizes=(1, 2), models=TINY_SHAPES, serve_prompts=(1, 2),
              serve_requests=8, concurrency=(1, 2), concurrency_requests=4, new_tokens=4)  # fmt: skip

AXES = {  # name -> (title, x label)
    "train_length": ("Training against input length", "real input tokens per row"),
    "train_virtual_tokens": ("Training against virtual tokens", "virtual tokens"),
    "train_batch": ("Training against batch size", "batch size (rows)"),
    "train_model_size": ("Training against model size (random-weight Llama family)", "parameters"),
    "serve_prompts": ("Serving against distinct prompts in a round of requests", "distinct soft prompts"),
    "serve_concurrency": ("Serving against concurrent requests", "requests arriving at once"),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- training data
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


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainSetup:
    """What every training point shares."""

    steps: int
    lr: float
    seed: int
    memory: str
    """train_speed's memory method: vmhwm or sample."""


def point_summary(ours: RunResult, peft: RunResult, reference: float) -> dict:
    """One point's summary, by train_speed.py's rules (its `summarize` takes medians over repetitions; a point here
    is one run): correctness against the reference first; no ratio against a peer whose step-0 loss is not the
    reference's."""
    rel = lambda a, b: float(f"{abs(a - b) / abs(b):.3g}")  # noqa: E731
    peer_correct = rel(peft.loss_step0, reference) <= CORRECT_REL
    return {
        "peer_correct": peer_correct,
        "ours_correct": rel(ours.loss_step0, reference) <= CORRECT_REL,
        "speedup": round(ours.tokens_per_s / peft.tokens_per_s, 3) if peer_correct else None,
        "memory_ratio": round(ours.peak_bytes / peft.peak_bytes, 3) if peer_correct else None,
        "ours_tokens_per_s": round(ours.tokens_per_s, 1),
        "peft_tokens_per_s": round(peft.tokens_per_s, 1),
        "ours_peak_mb": round(ours.peak_bytes / MB, 1),
        "peft_peak_mb": round(peft.peak_bytes / MB, 1),
        "reference_loss_step0": round(reference, 6),
        "ours_loss_step0": round(ours.loss_step0, 6),
        "peft_loss_step0": round(peft.loss_step0, 6),
        "loss_rel_diff_step0": rel(ours.loss_step0, peft.loss_step0),
        "ours_loss_last": round(ours.loss_last, 6),
        "peft_loss_last": round(peft.loss_last, 6),
    }


def train_point(backbone, method: str, n: int, batches: list[list], setup: TrainSetup) -> dict:
    """One point: the independent step-0 reference loss, then ours and PEFT side by side over `batches` (the first
    one the warm-up step)."""
    model = backbone.model
    before = model_state(model)
    reference = reference_loss(backbone, method, n, setup.seed, batches[0])
    steps = {"ours": ours_step(backbone, method, n, setup.lr, setup.seed),
             "peft": peft_step(backbone, method, n, setup.lr, setup.seed)}  # fmt: skip
    assert model_state(model) == before, "wrapping the model in PEFT changed it"
    runs = paired_runs(steps, batches, setup.memory, flip=False)
    del steps  # drops PEFT's wrapper before the next point
    assert model_state(model) == before, "the base model changed during training"
    row = point_summary(runs["ours"], runs["peft"], reference)
    row.update(method=method, virtual_tokens=n, batch_size=len(batches[0]), timed_steps=len(batches) - 1,
               tokens_per_step=round(statistics.mean(sum(len(e.input_ids) + len(e.target_ids) for e in b)
                                                     for b in batches), 1))  # fmt: skip
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
    train_point(backbone, "prompt", VIRTUAL_TOKENS, draw_batches(task, records, 1, setup.seed), setup)


def train_length(backbone, records: list[dict], sizes: Sizes, setup: TrainSetup) -> list[dict]:
    task = make_task(backbone.tokenizer, "cls")
    rows = []
    for length in sizes.lengths:
        batches = fixed_length_batches(task, records, length, setup.steps + 1, setup.seed)
        rows.append(timed_point("train_length", f"{length} tokens/row", length, backbone, "prompt", VIRTUAL_TOKENS,
                                batches, setup))  # fmt: skip
    return rows


def train_virtual_tokens(backbone, records: list[dict], sizes: Sizes, setup: TrainSetup) -> list[dict]:
    task = make_task(backbone.tokenizer, "cls")
    batches = draw_batches(task, records, setup.steps + 1, setup.seed)
    return [timed_point("train_virtual_tokens", f"{method} tuning, {n} virtual tokens", n, backbone, method, n,
                        batches, setup)
            for method in ("prompt", "prefix") for n in sizes.virtual_tokens]  # fmt: skip


def train_batch(backbone, records: list[dict], sizes: Sizes, setup: TrainSetup) -> list[dict]:
    task = make_task(backbone.tokenizer, "cls")
    rows = []
    for size in sizes.batch_sizes:
        batches = draw_batches(task, records, setup.steps + 1, setup.seed, size)
        rows.append(timed_point("train_batch", f"batch {size}", size, backbone, "prompt", VIRTUAL_TOKENS, batches,
                                setup))  # fmt: skip
    return rows


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


def train_model_size(backbone, records: list[dict], sizes: Sizes, setup: TrainSetup) -> list[dict]:
    tokenizer = backbone.tokenizer
    task = make_task(tokenizer, "cls")
    rows = []
    for name, shape in sizes.models.items():
        started = time.perf_counter()
        llama = random_llama(shape, tokenizer, setup.seed)
        params = sum(p.numel() for p in llama.model.parameters())  # tied embeddings counted once
        log(f"[train_model_size] {name}: {params:,} parameters, built in {time.perf_counter() - started:.0f} s")
        steps = setup.steps if params <= FEWER_STEPS_ABOVE else max(1, setup.steps // 2)
        batches = draw_batches(task, records, steps + 1, setup.seed)
        row = timed_point("train_model_size", f"{name} ({params / 1e6:.0f}M parameters)", params, llama, "prompt",
                          VIRTUAL_TOKENS, batches, setup)  # fmt: skip
        rows.append({**row, "model": name, "parameters": params, "shape": shape})
        del llama  # the next model is built with this one's memory freed
        gc.collect()
    return rows


TRAIN_AXES = {"train_length": train_length, "train_virtual_tokens": train_virtual_tokens,
              "train_batch": train_batch, "train_model_size": train_model_size}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- serving
Round = list[tuple[int, int]]
"""Requests arriving at once, each (text index, prompt index)."""
Timed = tuple[float, list[float], list[list[int]]]
"""A round's makespan (s), each request's time to first token (s) and its generated token ids."""


def request_text(i: int) -> str:
    """A distinct short text per request, so that only the soft prompt can be shared between requests."""
    from serve_speed import STARTS, TOPICS

    return f"{STARTS[i % len(STARTS)]} {TOPICS[(i // len(STARTS)) % len(TOPICS)]}, part {i // 64 + 1}."


def prompts_plan(sizes: Sizes) -> dict[int, list[Round]]:
    """serve_prompts: one round of all requests, request i behind prompt i mod k."""
    return {k: [[(i, i % k) for i in range(sizes.serve_requests)]] for k in sizes.serve_prompts}


def concurrency_plan(sizes: Sizes) -> dict[int, list[Round]]:
    """serve_concurrency: rounds of c requests until `concurrency_requests` (at least one round), over 4 prompts."""
    plan = {}
    for c in sizes.concurrency:
        rounds = max(1, sizes.concurrency_requests // c)
        plan[c] = [[(r * c + j, (r * c + j) % CONCURRENCY_PROMPTS) for j in range(c)] for r in range(rounds)]
    return plan


SERVE_PLANS = {"serve_prompts": prompts_plan, "serve_concurrency": concurrency_plan}


@dataclass
class ServeRun:
    """One side's rounds of one point: summed wall time, each request's time to first token, and its tokens."""

    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, seconds: float, ttft: list[float], outputs: list[list[int]]) -> None:
        self.seconds += seconds
        self.ttft += ttft
        self.outputs += outputs

    def summary(self) -> dict:
        ttft = sorted(self.ttft)
        p95 = statistics.quantiles(ttft, n=20, method="inclusive")[-1] if len(ttft) > 1 else ttft[0]
        return {"tokens_per_s": round(sum(map(len, self.outputs)) / self.seconds, 1),
                "ttft_ms_median": round(statistics.median(ttft) * 1000, 1), "ttft_ms_p95": round(p95 * 1000, 1),
                "seconds": round(self.seconds, 2)}  # fmt: skip


def round_ours(engine, requests: list[tuple[list[int], torch.Tensor]], new_tokens: int) -> Timed:
    """Submit all rows at once and step the engine until all finish (streamed: each row reports its first token)."""
    from softprompt.serve.engine import Sampling, Sequence

    first: dict[int, float] = {}
    done: dict[int, list[int]] = {}
    errors: list[str] = []
    start = time.perf_counter()

    def sink(i: int):
        def take(update) -> None:
            first.setdefault(i, time.perf_counter() - start)
            if update.finish_reason == "error":
                errors.append(update.error)
            if update.finished:
                done[i] = update.tokens
        return take

    engine.submit([Sequence(ids, prefix, Sampling(max_tokens=new_tokens, ignore_eos=True), sink(i), stream=True)
                   for i, (ids, prefix) in enumerate(requests)])  # fmt: skip
    while len(done) < len(requests):
        engine.step()
    if errors:
        raise SystemExit(f"our engine failed: {errors[0]}")
    rows = range(len(requests))
    return time.perf_counter() - start, [first[i] for i in rows], [done[i] for i in rows]


def round_vllm(url: str, bodies: list[dict]) -> Timed:
    """vllm_side.run_direct's requests (all posted at once, streamed), also timing each one's first token, which
    run_direct does not report."""
    import httpx2

    async def one(client, body: dict, start: float):
        tokens, first = [], None
        async with client.stream("POST", "/v1/completions", json={"model": "base", "stream": True,
                                                                  "return_token_ids": True, **body}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                    if ids and first is None:
                        first = time.perf_counter() - start
                    tokens += ids
        return first, tokens

    async def all_at_once():
        async with httpx2.AsyncClient(base_url=url, timeout=600,
                                      limits=httpx2.Limits(max_connections=len(bodies))) as client:  # fmt: skip
            start = time.perf_counter()
            done = await asyncio.gather(*(one(client, body, start) for body in bodies))
            return time.perf_counter() - start, done

    makespan, done = asyncio.run(all_at_once())
    if any(first is None for first, _ in done):
        raise SystemExit("vLLM returned a request without tokens; see /tmp/scaling_vllm.log")
    return makespan, [first for first, _ in done], [tokens for _, tokens in done]


@dataclass
class ServeWork:
    """What both servers are given: the prompts (soft embeddings and our cached K/V) and every axis's plan."""

    ids: Callable[[int], list[int]]
    """Token ids of request text i."""
    soft: list[torch.Tensor]
    """(20, hidden) per prompt."""
    prefixes: list[torch.Tensor]
    """(layers, 2, kv_heads, 20, head_dim) per prompt: what the server's registry caches."""
    plans: dict[str, dict[int, list[Round]]]
    new_tokens: int


def serve_work(backbone, names: list[str], sizes: Sizes) -> ServeWork:
    from serve_speed import build_prompt

    plans = {name: SERVE_PLANS[name](sizes) for name in names}
    count = 1 + max(k for plan in plans.values() for rounds in plan.values() for r in rounds for _, k in r)
    prompts = [build_prompt(backbone, VIRTUAL_TOKENS, seed) for seed in range(count)]
    with torch.no_grad():  # once per prompt, as the server's registry does when it loads one
        prefixes = [p.kv(backbone).detach() for p in prompts]
    tokenizer = backbone.tokenizer
    return ServeWork(lambda i: tokenizer(request_text(i))["input_ids"], [p.embeddings.detach() for p in prompts],
                     prefixes, plans, sizes.new_tokens)  # fmt: skip


def serve_ours(backbone, work: ServeWork, name: str) -> tuple[list[dict], dict[int, ServeRun]]:
    """Every point of one axis on our engine (a fresh engine per point); each point's first request checked against
    uncached `[P; E]` decoding."""
    from serve_speed import reference_generate, same_before_eos

    from softprompt.generate import eos_ids
    from softprompt.serve.engine import Engine, EngineConfig

    eos = eos_ids(backbone.tokenizer, backbone.model.generation_config)
    rows, runs = [], {}
    for x, rounds in work.plans[name].items():
        started = time.perf_counter()
        widest = max(map(len, rounds))
        engine = Engine(backbone, EngineConfig(max_batch=MAX_ROWS, max_queue=max(widest, MAX_ROWS)))
        run = ServeRun()
        for requests in rounds:
            run.add(*round_ours(engine, [(work.ids(i), work.prefixes[k]) for i, k in requests], work.new_tokens))
        text, prompt = rounds[0][0]
        reference = reference_generate(backbone, work.soft[prompt], work.ids(text), work.new_tokens)
        row = {"x": x, "requests": sum(map(len, rounds)), "rounds": len(rounds), "per_round": widest,
               "prompts": len({k for r in rounds for _, k in r}),
               "ours": {**run.summary(), "correct": same_before_eos(reference, run.outputs[0], eos)}}
        rows.append(row)
        runs[x] = run
        summary = row["ours"]
        log(f"[{name}] {x}: ours {summary['tokens_per_s']:.1f} tok/s, TTFT median {summary['ttft_ms_median']:.0f} ms, "
            f"correct {summary['correct']} ({time.perf_counter() - started:.0f} s)")  # fmt: skip
    return rows, runs


def warm_up_ours(backbone, work: ServeWork) -> None:
    """A round as wide as the widest point first (2 tokens each): one-time costs, and the growth of the process's
    heap to a full batch's size, stay out of the first point (with a 4-row warm-up, the first point ran at 194
    tokens/s in a full run and at 301 when rerun)."""
    from softprompt.serve.engine import Engine, EngineConfig

    round_ours(Engine(backbone, EngineConfig(max_batch=MAX_ROWS, max_queue=MAX_ROWS)),
               [(work.ids(i), work.prefixes[0]) for i in range(MAX_ROWS)], 2)  # fmt: skip


def serve_vllm(work: ServeWork, results: dict[str, list[dict]], ours: dict[str, dict[int, ServeRun]]) -> str:
    """Every planned point on one `vllm serve` process (started here, stopped at the end); fills each row's "vllm"
    entry, with how many of its outputs equal ours. Returns vLLM's version."""
    import urllib.request

    from serve_speed import same_before_eos
    from vllm_side import start_vllm, stop_vllm

    from softprompt.models import embedded_model_dir
    from softprompt.vllm import InputEmbeddings, encode

    front = InputEmbeddings.load("smollm2-135m")
    greedy = dict(max_tokens=work.new_tokens, temperature=0, ignore_eos=True)

    def bodies(requests: Round) -> list[dict]:
        return [{"prompt_embeds": encode(front.prompt_embeds(work.soft[k], work.ids(i))), **greedy}
                for i, k in requests]  # fmt: skip

    log("starting vllm serve ...")
    started = time.perf_counter()
    process, url = start_vllm(embedded_model_dir(), port=8932, log=Path("/tmp/scaling_vllm.log"))
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=10) as response:
            version = json.loads(response.read())["version"]
        log(f"vllm serve {version} up in {time.perf_counter() - started:.0f} s; warming up ...")
        round_vllm(url, [{**b, "max_tokens": 2} for b in bodies([(i, 0) for i in range(4)])])
        for name, plan in work.plans.items():
            for row in results[name]:
                started = time.perf_counter()
                run = ServeRun()
                for requests in plan[row["x"]]:
                    run.add(*round_vllm(url, bodies(requests)))  # encoded before the round's clock starts
                equal = sum(same_before_eos(a, b, set()) for a, b in zip(ours[name][row["x"]].outputs, run.outputs))
                row["vllm"] = {**run.summary(), "equal_ours": equal}
                log(f"[{name}] {row['x']}: vLLM {row['vllm']['tokens_per_s']:.1f} tok/s, TTFT median "
                    f"{row['vllm']['ttft_ms_median']:.0f} ms, {equal}/{row['requests']} outputs equal ours "
                    f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    finally:
        stop_vllm(process)
    return version


# ---------------------------------------------------------------------------------------------------- plots
def train_lines(points: list[dict]) -> list[tuple[str, str, str, list, list, list]]:
    """(label, colour, line style, x, tokens/s, peak MB) per line: ours and PEFT for each method on the axis; PEFT's
    value is NaN (a gap) where its step-0 loss is wrong."""
    methods = list(dict.fromkeys(p["method"] for p in points))
    lines = []
    for method in methods:
        rows = [p for p in points if p["method"] == method]
        suffix = f" ({method} tuning)" if len(methods) > 1 else ""
        style = "-" if method == "prompt" else "--"
        x = [p["x"] for p in rows]
        lines.append((f"softprompt{suffix}", "tab:blue", style, x, [p["ours_tokens_per_s"] for p in rows],
                      [p["ours_peak_mb"] for p in rows]))  # fmt: skip
        nan = float("nan")
        lines.append((f"PEFT{suffix}", "tab:orange", style, x,
                      [p["peft_tokens_per_s"] if p["peer_correct"] else nan for p in rows],
                      [p["peft_peak_mb"] if p["peer_correct"] else nan for p in rows]))  # fmt: skip
    return lines


def serve_lines(points: list[dict]) -> list[tuple[str, str, str, list, list, list]]:
    """(label, colour, style, x, tokens/s, TTFT median ms) for our engine and, where it ran, vLLM; TTFT p95 dotted."""
    lines = []
    for side, label, colour in (("ours", "softprompt engine", "tab:blue"), ("vllm", "vLLM", "tab:green")):
        rows = [p for p in points if side in p]
        if rows:
            x = [p["x"] for p in rows]
            lines.append((label, colour, "-", x, [p[side]["tokens_per_s"] for p in rows],
                          [p[side]["ttft_ms_median"] for p in rows]))  # fmt: skip
            lines.append((f"{label}, p95", colour, ":", x, None, [p[side]["ttft_ms_p95"] for p in rows]))
    return lines


def plot_axis(name: str, points: list[dict], path: Path, stamp: str) -> None:
    """Two panels side by side, log-x: tokens/s on the left, peak MB (training) or TTFT (serving) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, x_label = AXES[name]
    serving = name.startswith("serve_")
    lines = serve_lines(points) if serving else train_lines(points)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, colour, style, x, speed, other in lines:
        if speed is not None:
            left.plot(x, speed, style, color=colour, marker="o", label=label)
        right.plot(x, other, style, color=colour, marker="o", label=label)
    left.set_ylabel("generated tokens/s" if serving else "real input tokens/s")
    right.set_ylabel("time to first token (ms)" if serving else "peak MB above the step's starting RSS")
    ticks = {p["x"]: f"{p['model']}\n{p['x'] / 1e6:.1f}M" if "model" in p else str(p["x"]) for p in points}
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax, values in ((left, [v for *_, speed, _ in lines for v in speed or [] if v == v]),
                       (right, [v for *_, other in lines for v in other if v == v])):  # v == v: not NaN
        if values and max(values) > 20 * min(values):
            ax.set_yscale("log")  # spans more than an order of magnitude
    wrong = [p["label"] for p in points if not serving and not p["peer_correct"]]
    if wrong:
        fig.text(0.5, 0.01, f"PEFT not plotted where its step-0 loss differs from the reference: {', '.join(wrong)}",
                 ha="center", fontsize=8, color="tab:red")  # fmt: skip
    fig.suptitle(f"{title}\n{stamp}", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- report
def header(args, sizes: Sizes, memory: str) -> dict:
    import peft
    import transformers

    return {
        "date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "settings": {"timed_steps": args.steps, "timed_steps_above_500M_parameters": max(1, args.steps // 2),
                     "warm_up_steps": 1, "threads": args.threads, "lr": args.lr, "seed": args.seed, "memory": memory,
                     "quick": args.quick, "dtype": "float32", "batch_size": BATCH_SIZE,
                     "virtual_tokens": VIRTUAL_TOKENS, "serve_new_tokens": sizes.new_tokens,
                     "serve_max_rows": MAX_ROWS, "serve_concurrency_prompts": CONCURRENCY_PROMPTS},
        "notes": [
            "Training tokens/s count real input tokens (input + target, no pads, no virtual tokens); peak MB is the "
            "largest over a point's steps of the peak RSS during a step above the RSS just before it.",
            "peer_correct / ours_correct: the library's step-0 loss within 1e-4 (relative) of transformers' own loss "
            "over full logits. Where peer_correct is false, PEFT's values below were measured but are not plotted and "
            "no speedup or memory_ratio is given: a speed of a wrong computation means nothing.",
            "Serving: tokens/s = generated tokens / summed wall time of a point's rounds; TTFT from a round's start to "
            "a request's first streamed token. ours.correct: the point's first request equals uncached [P; E] greedy "
            "decoding; vllm.equal_ours: requests whose greedy tokens equal ours.",
        ],
    }


def save(report: dict, out: Path) -> None:
    """scaling.json and one PNG per axis measured so far (rewritten after every axis)."""
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "machine": machine()}
    for name, axis in report["axes"].items():
        plot_axis(name, axis["points"], out / f"{name}.png", f"{axis['date']} · {report['machine']}")
    (out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")


def axis_entry(name: str, points: list[dict]) -> dict:
    title, x_label = AXES[name]
    return {"title": title, "x": x_label, "date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            "points": points}


# ---------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(AXES), help=f"comma-separated subset of {', '.join(AXES)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per point after 1 warm-up step (default 2, --quick 1; models "
                             "above 500M parameters run half as many, at least 1)")  # fmt: skip
    parser.add_argument("--no-vllm", action="store_true", help="serving axes without vLLM (no .venv-vllm needed)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scaling", help="where the PNGs and JSON go")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere: a smoke check, not a result")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.axes = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in args.axes if a not in AXES]
    if unknown or not args.axes:
        parser.error(f"unknown axis/axes {unknown}; choose from {', '.join(AXES)}")
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 2)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    sizes = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore")  # PEFT's and transformers' deprecation notes would repeat at every point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from softprompt.backbones import backbone_for
    from softprompt.datasets import sentiment_splits
    from softprompt.models import load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    backbone = backbone_for(*load_model("smollm2-135m"))
    with torch.no_grad():  # page the weights in (memory-mapped from disk), or the first point's peak would hold them
        sum(float(p.sum()) for p in backbone.model.parameters())
    memory = "vmhwm" if reset_high_water_mark() else "sample"
    report = {**header(args, sizes, memory), "axes": {}}
    previous = args.out / "scaling.json"
    if set(args.axes) != set(AXES) and previous.exists():  # --only: the other axes' earlier points stay
        report["axes"] = {k: v for k, v in json.loads(previous.read_text())["axes"].items() if k not in args.axes}
    setup = TrainSetup(args.steps, args.lr, args.seed, memory)
    records = sentiment_splits()["train"]

    train_names = [a for a in args.axes if a in TRAIN_AXES]
    if train_names:
        warm_up(backbone, records, setup)
    for name in train_names:
        started = time.perf_counter()
        report["axes"][name] = axis_entry(name, TRAIN_AXES[name](backbone, records, sizes, setup))
        report["axes"][name]["seconds"] = round(time.perf_counter() - started, 1)
        save(report, args.out)
        log(f"[{name}] done in {(time.perf_counter() - started) / 60:.1f} min")

    serve_names = [a for a in args.axes if a in SERVE_PLANS]
    if serve_names:
        started = time.perf_counter()
        work = serve_work(backbone, serve_names, sizes)
        log(f"{len(work.soft)} soft prompts and their K/V built in {time.perf_counter() - started:.0f} s")
        warm_up_ours(backbone, work)
        ours = {}
        for name in serve_names:
            started = time.perf_counter()
            points, ours[name] = serve_ours(backbone, work, name)
            report["axes"][name] = {**axis_entry(name, points), "seconds": round(time.perf_counter() - started, 1)}
            save(report, args.out)
        if not args.no_vllm:  # after every in-process measurement, so vLLM never competes with them for the cores
            started = time.perf_counter()
            results = {name: report["axes"][name]["points"] for name in serve_names}
            report["vllm_version"] = serve_vllm(work, results, ours)
            report["vllm_seconds"] = round(time.perf_counter() - started, 1)
            save(report, args.out)
    report["seconds"] = round(time.perf_counter() - began, 1)
    save(report, args.out)
    log(f"wrote {args.out}/scaling.json and {len(report['axes'])} plot(s) in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
