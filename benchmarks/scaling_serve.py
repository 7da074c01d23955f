"""The serving axes of scaling.py: rounds of requests on our engine (driven in this process by common/serving.py's
`drive`, as serve_speed.py does) and on `vllm serve --enable-prompt-embeds` (common/completions.py's client), one
point per value of an axis: distinct prompts in a round, requests arriving at once."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common.completions import embeds_body, post_round, vllm_server
from benchmarks.common.machine import log
from benchmarks.common.model import vocab_prompt
from benchmarks.common.serving import (Round, drive, greedy, local_engine, percentile, reference_generate,
                                       request_text, same_before_eos)  # fmt: skip

PROMPT_TOKENS = 20
"""Virtual tokens of every served soft prompt."""
MAX_ROWS = 128
"""Rows decoded together by either server: vLLM's default max_num_seqs for its API server on CPU (0.32)."""
CONCURRENCY_PROMPTS = 4
"""Distinct prompts in serve_concurrency (request i uses prompt i mod 4)."""


@dataclass(frozen=True)
class ServeSizes:
    """The points of the serving axes."""

    prompts: tuple[int, ...]
    requests: int
    """Requests in serve_prompts' one round."""
    concurrency: tuple[int, ...]
    concurrency_requests: int
    """Requests per serve_concurrency point (rounds of `c` until this many; at least one round)."""
    new_tokens: int


FULL = ServeSizes(prompts=(1, 4, 16, 64, 256), requests=256, concurrency=(1, 4, 16, 64), concurrency_requests=32,
                  new_tokens=16)  # fmt: skip
QUICK = ServeSizes(prompts=(1, 2), requests=8, concurrency=(1, 2), concurrency_requests=4, new_tokens=4)

Requests = list[tuple[int, int]]
"""The requests of a round, all arriving at once, each (text index, prompt index)."""


def prompts_plan(sizes: ServeSizes) -> dict[int, list[Requests]]:
    """serve_prompts: one round of all requests, request i behind prompt i mod k."""
    return {k: [[(i, i % k) for i in range(sizes.requests)]] for k in sizes.prompts}


def concurrency_plan(sizes: ServeSizes) -> dict[int, list[Requests]]:
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

    def add(self, served: Round) -> None:
        self.seconds += served.seconds
        self.ttft += served.first
        self.outputs += served.outputs

    def summary(self) -> dict:
        return {"tokens_per_s": round(sum(map(len, self.outputs)) / self.seconds, 1),
                "ttft_ms_median": round(statistics.median(self.ttft) * 1000, 1),
                "ttft_ms_p95": round(percentile(sorted(self.ttft), 95) * 1000, 1),
                "seconds": round(self.seconds, 2)}  # fmt: skip


@dataclass
class ServeWork:
    """What both servers are given: the prompts (soft embeddings and our cached K/V) and every axis's plan."""

    ids: Callable[[int], list[int]]
    """Token ids of request text i."""
    soft: list[torch.Tensor]
    """(20, hidden) per prompt."""
    prefixes: list[torch.Tensor]
    """(layers, 2, kv_heads, 20, head_dim) per prompt: what the server's registry caches."""
    plans: dict[str, dict[int, list[Requests]]]
    new_tokens: int


def serve_work(backbone, names: list[str], sizes: ServeSizes) -> ServeWork:
    plans = {name: SERVE_PLANS[name](sizes) for name in names}
    count = 1 + max(k for plan in plans.values() for rounds in plan.values() for r in rounds for _, k in r)
    prompts = [vocab_prompt(backbone, "prompt", PROMPT_TOKENS, seed) for seed in range(count)]
    with torch.no_grad():  # once per prompt, as the server's registry does when it loads one
        prefixes = [p.kv(backbone).detach() for p in prompts]
    tokenizer = backbone.tokenizer
    return ServeWork(lambda i: tokenizer(request_text(i, numbered=True))["input_ids"],
                     [p.embeddings.detach() for p in prompts], prefixes, plans, sizes.new_tokens)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- our engine
def our_engine(backbone, widest: int = MAX_ROWS):
    """At most MAX_ROWS rows decoding, as vLLM; the rest of a wider round waits in the queue."""
    return local_engine(backbone, MAX_ROWS, max(widest, MAX_ROWS))


def serve_ours(backbone, work: ServeWork, name: str) -> tuple[list[dict], dict[int, ServeRun]]:
    """Every point of one axis on our engine (a fresh engine per point, its rows streamed so that each reports its
    first token); each point's first request checked against uncached `[P; E]` decoding."""
    from softprompt.scoring.generate import eos_ids

    eos = eos_ids(backbone.tokenizer, backbone.model.generation_config)
    rows, runs = [], {}
    for x, rounds in work.plans[name].items():
        started = time.perf_counter()
        widest = max(map(len, rounds))
        engine, run = our_engine(backbone, widest), ServeRun()
        for requests in rounds:
            run.add(drive(engine, [(work.ids(i), work.prefixes[k]) for i, k in requests], greedy(work.new_tokens),
                          stream=True))  # fmt: skip
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
    drive(our_engine(backbone), [(work.ids(i), work.prefixes[0]) for i in range(MAX_ROWS)], greedy(2), stream=True)


# ---------------------------------------------------------------------------------------------------- vLLM
def serve_vllm(work: ServeWork, results: dict[str, list[dict]], ours: dict[str, dict[int, ServeRun]]) -> str:
    """Every planned point on one `vllm serve` process (started here, stopped at the end); fills each row's "vllm"
    entry, with how many of its outputs equal ours. Returns vLLM's version."""
    from softprompt.models import embedded_model_dir
    from softprompt.serve.vllm_embeds import InputEmbeddings

    front = InputEmbeddings.load("smollm2-135m")

    def bodies(requests: Requests, max_tokens: int = work.new_tokens) -> list[dict]:
        return [embeds_body(front, work.soft[k], work.ids(i), max_tokens=max_tokens, temperature=0, ignore_eos=True)
                for i, k in requests]  # fmt: skip

    log("starting vllm serve ...")
    started = time.perf_counter()
    with vllm_server(embedded_model_dir(), port=8932, log=Path("/tmp/scaling_vllm.log")) as server:
        log(f"vllm serve {server.version} up in {time.perf_counter() - started:.0f} s; warming up ...")
        post_round(server.url, bodies([(i, 0) for i in range(4)], max_tokens=2))
        for name, plan in work.plans.items():
            for row in results[name]:
                started = time.perf_counter()
                run = ServeRun()
                for requests in plan[row["x"]]:
                    run.add(post_round(server.url, bodies(requests)))  # encoded before the round's clock starts
                equal = sum(same_before_eos(a, b, set()) for a, b in zip(ours[name][row["x"]].outputs, run.outputs))
                row["vllm"] = {**run.summary(), "equal_ours": equal}
                log(f"[{name}] {row['x']}: vLLM {row['vllm']['tokens_per_s']:.1f} tok/s, TTFT median "
                    f"{row['vllm']['ttft_ms_median']:.0f} ms, {equal}/{row['requests']} outputs equal ours "
                    f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    return server.version
