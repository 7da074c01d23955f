"""Driving an engine through a round of requests, the request texts, and the checks of what came out
(serve_speed.py, the serving half of scaling).

A round is a set of requests that all arrive at once; `drive` submits them to our engine (`local_engine`, stepped
here, in this thread, as nothing else runs) or to the front to vLLM (`front_engine`, which runs its own worker), and
reports when each request got its first and last token."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

STARTS = ["Write a short story about", "Explain to a child how", "List three facts about", "Describe the smell of",
          "Give me a recipe for", "What is the history of", "Summarize the plot of a film about",
          "Translate into French: I love", "Write a haiku about", "Why do people enjoy", "Compose an email about",
          "Tell a joke about", "How would you teach", "Invent a new sport involving", "Describe a city built on",
          "Argue for and against"]  # fmt: skip
TOPICS = ["the sea", "old trains and rainy afternoons", "a cat", "mountains in winter"]


def prompt_lengths(prompts: int) -> list[int]:
    """The virtual tokens of the serving workload's prompts: 10, 12, ... 40, then round again."""
    return [10 + (i * 2) % 31 for i in range(prompts)]


def request_text(i: int, numbered: bool = False) -> str:
    """Request i's short text; `numbered` adds the 64-request block it falls in, so that texts stay distinct (and
    only the soft prompt can be shared between requests) beyond the 64 start-topic pairs."""
    text = f"{STARTS[i % len(STARTS)]} {TOPICS[(i // len(STARTS)) % len(TOPICS)]}"
    return f"{text}, part {i // 64 + 1}." if numbered else f"{text}."


def local_engine(backbone, max_batch: int, max_queue: int):
    """Our engine over `backbone`, not started: `drive` steps it (each prompt's K/V computed beforehand, as the
    server's registry does)."""
    from softprompt.serve.engines.base import EngineConfig
    from softprompt.serve.engines.local import LocalEngine

    return LocalEngine(backbone, EngineConfig(max_batch=max_batch, max_queue=max_queue))


def front_engine(front, url: str, max_batch: int, max_queue: int):
    """Our front to the vLLM server at `url` (what `softprompt serve --vllm-url` runs), started: rows go to vLLM
    as `[P; E]` from its own worker; `front` is the served model's `InputEmbeddings`."""
    from softprompt.serve.engines.base import EngineConfig
    from softprompt.serve.engines.vllm import VllmEngine

    return VllmEngine(front, url, EngineConfig(max_batch=max_batch, max_queue=max_queue)).start()


@dataclass
class Round:
    """How one side served a round; times in seconds from the round's start, per request in submission order."""

    seconds: float
    """Until the last request finished (the makespan)."""
    first: list[float]
    """The first token (streamed rows; for others, the only update comes when they finish)."""
    done: list[float]
    outputs: list[list[int]]
    """The generated token ids."""


def drive(engine, rows: list[tuple[list[int], torch.Tensor | None]], sampling, stream: bool = False,
          threaded: bool = False) -> Round:
    """Submit `rows` ((prompt token ids, prompt input) each, all with `sampling`) at once and wait until all finish.
    Our engine is stepped in this thread; a `threaded` engine (the front to vLLM) runs its own worker and is polled
    every 5 ms. Any row that fails ends the benchmark."""
    from softprompt.serve.engines.base import Sequence

    first: dict[int, float] = {}
    done: dict[int, tuple[float, list[int]]] = {}
    errors: list[str] = []
    start = time.perf_counter()

    def sink(i: int):
        def take(update) -> None:
            now = time.perf_counter() - start
            first.setdefault(i, now)
            if update.finish_reason == "error":
                errors.append(update.error)
            if update.finished:
                done[i] = (now, update.tokens)

        return take

    engine.submit([Sequence(ids, prompt_input, sampling, sink(i), stream=stream)
                   for i, (ids, prompt_input) in enumerate(rows)])  # fmt: skip
    while len(done) < len(rows):
        if threaded:
            time.sleep(0.005)
        else:
            engine.step()
    seconds = time.perf_counter() - start
    if errors:
        raise SystemExit(f"the engine failed: {errors[0]}")
    order = range(len(rows))
    return Round(seconds, [first[i] for i in order], [done[i][0] for i in order], [done[i][1] for i in order])


def greedy(max_tokens: int, ignore_eos: bool = True):
    """Greedy decoding of exactly `max_tokens` tokens (unless `ignore_eos` is off): the work does not depend on the
    values of the untrained prompts."""
    from softprompt.serve.engines.base import Sampling

    return Sampling(max_tokens=max_tokens, ignore_eos=ignore_eos)


def reference_generate(backbone, embeddings: torch.Tensor, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding by the definition, independent of both libraries and of any cache: at every step the model
    reads the whole `[P; E]` as inputs_embeds (the soft prompt, then the embeddings of the text and the tokens so far)
    and the next token is the argmax of the last position."""
    model, tokens = backbone.model, list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            so_far = torch.tensor(tokens, device=model.device)
            embeds = torch.cat([embeddings.to(model.device, model.dtype), model.get_input_embeddings()(so_far)])[None]
            tokens.append(int(model(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax()))
    return tokens[len(ids) :]


def same_before_eos(ours: list[int], theirs: list[int], eos: set[int]) -> bool:
    """The two outputs agree up to our first EOS (greedy rows that ignore EOS may differ after it)."""
    cut = next((i for i, t in enumerate(ours) if t in eos), len(ours))
    return ours[:cut] == theirs[:cut]


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile, interpolated between the sorted values; a single value is its own percentile."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]
